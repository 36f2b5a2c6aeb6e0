#!/usr/bin/env bash
# The GPU figures in bench/RESULTS.md, on a lent machine (its own python3 with torch; the project's
# pins do not apply there). Two stages, because onnxruntime-gpu (70 MB even with only the sm_90
# kernels kept) travels in two parts of under 64 MiB: `train` stashes part 1 and measures the
# training feed; `sample` joins the parts, runs the CUDA sampler tests and the sampling benchmark.
#   OUT=/tmp/out [TRAIN_CONFIGS="paper:no:64:120 ..."] [LOADER_WORKERS="1 4 12 16"] bash bench/gpu.sh train
#   OUT=/tmp/out bash bench/gpu.sh sample [tests]
# Made beforehand by `bash bench/gpu_prepare.sh` (git-ignored): .gpuw/ = wheels of webdataset,
# braceexpand, omegaconf and torchcodec; .gpu1/xpart.00 + .gpu2/xpart.01 = the onnxruntime-gpu 1.31.1 cp312
# wheel unzipped, its CUDA provider pruned to sm_90 (bench/prune_fatbin.py), xz'd and split in two.
# Each stage's call carries .gpuw, the code and one part; the second call must reach the machine
# while it is still warm.
set -u
stage=${1:?train or sample}
OUT=${OUT:-/tmp/cvae-gpu-out}
mkdir -p "$OUT" /tmp/site /tmp/ortparts
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuw/*.whl 2>&1 | tail -2
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), '| onnxruntime', o.__version__, o.get_available_providers())"
# the shard reader decodes with torchcodec: without it nothing below runs, so stop here and say so
python3 -c "import torchcodec.decoders as d, torchcodec; print('torchcodec', torchcodec.__version__)" || exit 6

if [ "$stage" = train ]; then
  cp .gpu1/xpart.00 /tmp/ortparts/ && echo "part 1 stashed"
  work=/tmp/bench-train
  # the paper model for 450 steps: 3 epochs of the 9,600 train images, so windows cross epoch starts
  configs=${TRAIN_CONFIGS:-"paper:no:64:450 paper:bf16:64:450 resnet:bf16:64:120 resnet:no:64:120 resnet:bf16:256:30"}
  for cfg in $configs; do
    cfg=${cfg//:/ }
    set -- $cfg
    [ $SECONDS -lt 200 ] || { echo "skipped $cfg: time"; continue; }
    timeout 100 python3 bench/train.py --arch $1 --precision $2 --batch-size $3 --steps $4 --images 12000 --workers 12 --work $work 2>&1 | grep -v Warning | tail -6
    cp bench/results/train.json "$OUT/train-$1-$2-$3.json" 2>/dev/null; echo "[$SECONDS s]"
  done
  # the shard reader's cost per image, now against before (bench/feed.py: PIL + np.load), on this host's cores,
  # and decoding on the GPU (nvJPEG batches): its last line
  timeout 90 python3 bench/feed.py --work $work --repeats 2 2>&1 | tee "$OUT/feed.log" | tail -8
  # the feeds alone, by worker count (12 unless LOADER_WORKERS says; "" for none): does the shard
  # reader scale on this host, and what does an epoch's start cost with workers kept or started anew?
  for workers in ${LOADER_WORKERS-12}; do
    timeout 150 python3 bench/train.py --loader-only --epochs 2 --workers $workers --images 12000 --work $work 2>&1 | tail -2
  done
  exit 0
fi

# stage sample
[ -f /tmp/ortparts/xpart.00 ] || { echo "part 1 missing: the machine was not kept warm since stage train"; exit 3; }
cat /tmp/ortparts/xpart.00 .gpu2/xpart.01 > /tmp/ort.tar.xz
sha256sum /tmp/ort.tar.xz
python3 -c "import tarfile; tarfile.open('/tmp/ort.tar.xz').extractall('/tmp/site', filter='data')" || exit 4
python3 -c "
import torch, onnxruntime as o
print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())
" || exit 5
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_sampler.py tests/test_fusion.py tests/data/test_stream.py -k "cuda or graph or io_binding or threads" 2>&1 | tail -8
[ "${2:-}" = tests ] && exit 0  # the CUDA tests only
timeout 420 python3 bench/sample.py --seconds 1 2>&1 | grep -v -i warn | tee "$OUT/sample.log"
cp bench/results/sample.json "$OUT/" 2>/dev/null
exit 0
