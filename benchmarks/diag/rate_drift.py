"""Do the rates `fuyou probe` takes (best of a few samples, seconds long) hold for a run minutes long?
Issue 5, planner check 1: its runs met the CPU AdamW and the disk 20-25% below the probe's rates.

    PYTHONPATH=. python -m benchmarks.diag.rate_drift [--ssd-dir /root/probe] [--disk-s 60] [--adam-samples 20]

1. CPU AdamW under the probe's emulated load, clipped as a clipped step runs it
   (`fuyou.plan.probe.cpu_rates_under_load`): every sample's Gparam/s, not just the best.
2. The disk in the probe's duplex pattern (`ssd_gbps`'s: one 512 MiB group read ahead while another is
   written behind, each pass reading what the last wrote) for `--disk-s` seconds: every pass's GB/s (read +
   written) with its start time, to show whether a short probe sees a burst the sustained rate does not.
Prints one line per sample, then min / median / max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from fuyou.plan.probe import GiB, MiB, _aligned, cpu_rates_under_load, duplex_pass


def adam_samples(repeats: int) -> list[float]:
    samples: list[float] = []

    def timer(fn, count: int) -> float:
        fn()
        out = []
        for _ in range(count):
            start_s = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start_s)
        samples.append(out)
        return min(out)

    cpu_rates_under_load(False, clip=0.5, timer=lambda fn, _: timer(fn, repeats))
    adam_s = samples[0]
    return [4 * (64 << 20) / s / 1e9 for s in adam_s]


def disk_passes(directory: str, seconds: float, file_bytes: int = 4 * GiB, group_bytes: int = 512 * MiB):
    from offload.ssd import PosixBackend

    os.makedirs(directory, exist_ok=True)
    backend = PosixBackend()
    paths = [tempfile.mkstemp(prefix="fuyou-drift-", suffix=".bin", dir=directory)[1] for _ in range(2)]
    rows = []
    try:
        handles = []
        for path in paths:
            os.truncate(path, file_bytes)
            handles.append(backend.open(path))
        ahead, behind = _aligned(group_bytes), _aligned(group_bytes).fill_(7)
        offsets = range(0, file_bytes - group_bytes + 1, group_bytes)
        for offset in offsets:  # fill the first file, as the probe's write test does
            backend.write(handles[0], behind, offset).result()
        os.fsync(handles[0].fd)
        start = time.perf_counter()
        k = 0
        while time.perf_counter() - start < seconds:
            source, target = handles[k % 2], handles[(k + 1) % 2]
            pass_start = time.perf_counter() - start
            seconds_pass = duplex_pass(backend, source, target, ahead, behind, offsets)
            rows.append((pass_start, 2 * len(offsets) * group_bytes / seconds_pass / 1e9))
            k += 1
        for handle in handles:
            backend.close(handle)
    finally:
        backend.shutdown()
        for path in paths:
            os.unlink(path)
    return rows


def summary(name: str, values: list[float]) -> None:
    print(f"{name}: min {min(values):.2f} median {statistics.median(values):.2f} max {max(values):.2f} "
          f"(n={len(values)}); best-of-first-3 {max(values[:3]):.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ssd-dir", default="/root/probe")
    parser.add_argument("--disk-s", type=float, default=60.0)
    parser.add_argument("--adam-samples", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (the probe's load)", file=sys.stderr)
        return 2
    adam = adam_samples(args.adam_samples)
    print("AdamW clipped, under load, Gparam/s per sample:", " ".join(f"{v:.2f}" for v in adam), flush=True)
    rows = disk_passes(args.ssd_dir, args.disk_s)
    print("disk duplex passes (start s: GB/s):", " ".join(f"{t:.0f}:{v:.2f}" for t, v in rows), flush=True)
    summary("AdamW clipped loaded Gparam/s", adam)
    summary("disk duplex GB/s", [v for _, v in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
