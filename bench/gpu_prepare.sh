#!/usr/bin/env bash
# Makes, on this machine, the git-ignored folders that bench/gpu.sh's two calls carry to a lent GPU
# machine (whose python3 3.12 has torch, accelerate, onnx and a CPU-only onnxruntime, but not these):
#   .gpuw/              wheels of webdataset, braceexpand, omegaconf and torchcodec (the shard reader's
#                       JPEG decoder, built for torch >= 2.11: the machine's 2.11 too), the versions of .venv if made
#   .gpu1/xpart.00      onnxruntime-gpu's cp312 wheel unzipped, its CUDA provider's kernels kept for
#   .gpu2/xpart.01      one SM only (bench/prune_fatbin.py), `tar | xz -6`, split in two parts of
#                       under 35 MB: each call's working tree stays under the device tool's 64 MiB
#                       (xz -9: 68.9 MB for 1.31.1 with sm_90 kept; -6 gave 69.7, too close to 70)
# Then, with a device lent (two calls, the second while the machine is still warm):
#   run(command="OUT=$OUT bash bench/gpu.sh train", carry=[".gpuw", ".gpu1"])
#   run(command="OUT=$OUT bash bench/gpu.sh sample", carry=[".gpuw", ".gpu2"])
# Usage: SM=90 (default: H100 and H200) ORT=1.31.1 bash bench/gpu_prepare.sh   (~3 minutes: 255 MB, then xz)
set -euo pipefail
cd "$(dirname "$0")/.."
SM=${SM:-90}
ORT=${ORT:-1.31.1}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
for folder in .gpuw .gpu1 .gpu2; do  # ignored: never committed, still carried by name
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
download() {  # NAME==VERSION... as cp312 x86-64 binaries (or pure-Python wheels)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform any "$@"
}

rm -rf .gpuw .gpu1 .gpu2 && mkdir -p .gpuw .gpu1 .gpu2
pinned=()
for name in webdataset braceexpand omegaconf torchcodec; do  # the versions the tests here ran with, where known
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  pinned+=("$name${version:+==$version}")
done
download -d .gpuw "${pinned[@]}"  # omegaconf 2.4 no longer needs antlr4: these four are all
ls .gpuw

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download -d "$work" "onnxruntime-gpu==$ORT"
mkdir "$work/tree"
"$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$work"/onnxruntime_gpu-*.whl "$work/tree"
provider=$(find "$work/tree" -name 'libonnxruntime_providers_cuda.so')
"$PY" bench/prune_fatbin.py "$provider" "$SM" "$provider.pruned" && mv "$provider.pruned" "$provider"
(cd "$work/tree" && tar cf - .) | xz -9 -T1 >"$work/ort.tar.xz"
split -b 35000000 -d "$work/ort.tar.xz" "$work/xpart."
parts=$(ls "$work"/xpart.* | wc -l)
[ "$parts" -eq 2 ] || { echo "expected 2 parts of the onnxruntime-gpu archive, got $parts: change the split size"; exit 1; }
mv "$work/xpart.00" .gpu1/ && mv "$work/xpart.01" .gpu2/
sha256sum "$work/ort.tar.xz"  # bench/gpu.sh prints the joined parts' sum on the machine: the same
du -sh .gpuw .gpu1 .gpu2
