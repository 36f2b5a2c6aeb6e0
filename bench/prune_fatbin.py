"""Zero the payloads of every cubin in a shared library's .nv_fatbin except one SM version, so
that the library compresses small enough to carry to a GPU machine of that SM. Used only to bring
onnxruntime-gpu (255 MB wheel) to the lent H200 for bench/gpu.sh: the sm_90 kernels, the only
ones an H200 loads, are untouched. Entry layout (read off the file): u16 kind, u16 version,
u32 header size, u64 padded payload size, u64 payload size, u32 ?, u32 SM version.

    python3 bench/prune_fatbin.py libonnxruntime_providers_cuda.so 90 out.so
"""

import collections
import struct
import sys

path, keep_sm, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = bytearray(open(path, "rb").read())
e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
secs = [struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
strtab = secs[e_shstrndx][4]


def name(s):
    return data[strtab + s[0] : data.index(b"\0", strtab + s[0])].decode()


fat = next(s for s in secs if name(s) == ".nv_fatbin")
start, end = fat[4], fat[4] + fat[5]
pos, stats, zeroed = start, collections.Counter(), 0
containers = 0
while pos < end:
    magic = struct.unpack_from("<I", data, pos)[0]
    if magic != 0xBA55ED50:
        # alignment padding between containers
        pos += (
            8
            if data[pos : pos + 8] == b"\0" * 8
            else (_ for _ in ()).throw(SystemExit(f"bad magic at {pos:#x}: {magic:#x}"))
        )
        continue
    version, hsize = struct.unpack_from("<HH", data, pos + 4)
    fsize = struct.unpack_from("<Q", data, pos + 8)[0]
    containers += 1
    entry, cend = pos + hsize, pos + hsize + fsize
    while entry < cend:
        kind, ever, ehsize = struct.unpack_from("<HHI", data, entry)
        padded = struct.unpack_from("<Q", data, entry + 8)[0]
        sm = struct.unpack_from("<I", data, entry + 28)[0]
        stats[(kind, sm)] += padded
        if sm != keep_sm:
            data[entry + ehsize : entry + ehsize + padded] = bytes(padded)
            zeroed += padded
        entry += ehsize + padded
    assert entry == cend, (entry, cend)
    pos = cend
print("containers", containers)
for (kind, sm), size in sorted(stats.items()):
    print("kind", kind, "sm", sm, f"{size / 1e6:.1f} MB")
print(f"zeroed {zeroed / 1e6:.1f} MB of {(end - start) / 1e6:.1f} MB")
open(out, "wb").write(data)
