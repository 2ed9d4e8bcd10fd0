"""How fast a disk goes for the probe's deep-queue pattern and for the optimizer's (group-sized: one group read
ahead while another is written behind, the next pass reading what the last one wrote). Issue 5, the
evidence behind `fuyou.plan.probe.ssd_gbps`'s duplex pattern. Note: the probe-pattern rows call
`ssd_gbps`; at commit e0b6b66, where it was run (RESULTS.md), that function's duplex was the deep queue.

    PYTHONPATH=. python benchmarks/diag/ssd_patterns.py /path/on/the/disk
"""
import os
import sys
import tempfile
import time

from fuyou.plan.probe import ssd_gbps, _aligned
from offload.ssd import PosixBackend
MiB, GiB = 1 << 20, 1 << 30
d = sys.argv[1] if len(sys.argv) > 1 else "/root/probe"
os.makedirs(d, exist_ok=True)
for size in (2 * GiB, 2 * GiB, 8 * GiB):
    w, r, dup, direct = ssd_gbps(d, size)
    print(f"probe pattern {size >> 30} GiB: write {w:.2f} read {r:.2f} duplex {dup:.2f} GB/s direct={direct}", flush=True)

group = 600 * 10**6 // 4096 * 4096
groups = 8
backend = PosixBackend()
paths = [tempfile.mkstemp(dir=d, suffix=".bin")[1] for _ in range(2)]
for p in paths:
    os.truncate(p, group * groups)
handles = [backend.open(p) for p in paths]
bufs = [_aligned(group).fill_(3) for _ in range(2)]
t = time.perf_counter()
for g in range(groups):
    backend.write(handles[0], bufs[0], g * group).result()
os.fsync(handles[0].fd)
print(f"group pattern: write-only {groups * group / (time.perf_counter() - t) / 1e9:.2f} GB/s", flush=True)
for p in range(4):
    src, dst = handles[p % 2], handles[1 - p % 2]
    t = time.perf_counter()
    for g in range(groups):
        fr = backend.read(src, bufs[0], g * group)
        fw = backend.write(dst, bufs[1], g * group)
        fr.result()
        fw.result()
    os.fsync(dst.fd)
    print(f"group pattern pass {p}: read + write {2 * groups * group / (time.perf_counter() - t) / 1e9:.2f} GB/s", flush=True)
t = time.perf_counter()
for g in range(groups):
    backend.read(handles[0], bufs[0], g * group).result()
print(f"group pattern: read-only {groups * group / (time.perf_counter() - t) / 1e9:.2f} GB/s", flush=True)
for h in handles:
    backend.close(h)
backend.shutdown()
for p in paths:
    os.unlink(p)
