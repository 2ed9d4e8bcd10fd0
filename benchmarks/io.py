"""I/O benchmark of the tiered store: disk, PCIe, and both at once, against the issue 3 goals.

    python -m benchmarks.io --dir /path/on/the/ssd          # on the GPU machine (about 3 minutes)
    python -m benchmarks.io --quick --dir /tmp/io-bench      # on a CPU-only machine, tiny sizes

Named cases, run in this order, each writing its rows into one JSON file:
- `raw_dd`: the disk by an independent method, `dd` with oflag/iflag=direct at 1-64 MiB blocks
  (queue depth 1).
- `store_ssd`: store write (CPU -> SSD) and read (SSD -> CPU) bandwidth over 1-64 MiB blocks and
  1-16 requests in flight, per backend (posix; kvikio when importable). Buffers are the store's own
  pinned tensors, so no staging copy; each read pass first drops the file from the page cache.
- `store_pcie`: H2D and D2H through `store.copy` against a bare pinned `tensor.copy_`.
- `ssd_to_gpu`: SSD -> GPU through the store (posix: staged through pinned memory; kvikio: into
  device memory directly), the path the runtime uses to fetch parameters.
- `concurrent`: an SSD read stream and an H2D stream at once (and SSD write with D2H), each sized to
  take about as long as the other alone.

Goals (issue 3): store SSD >= 0.9 x raw dd (best block size each), store PCIe >= 0.9 x bare copy,
concurrent time <= 1.1 x the slower leg alone. The Markdown table is printed last.

What it does not measure: GPUDirect Storage proper (the GPU machine is a VM without nvidia-fs, so
kvikio runs its POSIX path), random-offset I/O, and more than one disk.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import subprocess
import threading
import time
import traceback

import torch

from offload import TieredStore, kvikio_importable

MiB = 1 << 20


def drop_page_cache(path: str) -> None:
    """So a read pass measures the disk, not RAM (a no-op for pages never cached)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---- raw disk ------------------------------------------------------------------------------------


def _dd_parallel(job_args: list[list[str]]) -> float:
    """Run one `dd` per argument list at once; the seconds until the last one ends."""
    start_s = time.perf_counter()
    jobs = [subprocess.Popen(["dd", *args, "status=none"]) for args in job_args]
    for job in jobs:
        assert job.wait() == 0, "dd failed"
    return time.perf_counter() - start_s


def raw_dd(directory: str, total_bytes: int, block_sizes: list[int], num_jobs_options: list[int]) -> list[dict]:
    """dd with O_DIRECT: one job (queue depth 1), and several jobs on disjoint parts of one file
    (a deeper queue, as the store's threads make), so the reference is not held to depth 1."""
    path = os.path.join(directory, "dd-probe.bin")
    rows = []
    try:
        for num_jobs in num_jobs_options:
            for block_bytes in block_sizes:
                count = max(1, total_bytes // block_bytes // num_jobs)
                num_bytes = count * block_bytes * num_jobs
                write_s = _dd_parallel([
                    ["if=/dev/zero", f"of={path}", f"bs={block_bytes}", f"count={count}", f"seek={job * count}", "oflag=direct", "conv=notrunc,fdatasync"]
                    for job in range(num_jobs)
                ])
                drop_page_cache(path)
                read_s = _dd_parallel([
                    [f"if={path}", "of=/dev/null", f"bs={block_bytes}", f"count={count}", f"skip={job * count}", "iflag=direct"]
                    for job in range(num_jobs)
                ])
                rows.append({"block_MiB": block_bytes / MiB, "num_jobs": num_jobs, "num_bytes": num_bytes, "write_gbps": num_bytes / write_s / 1e9, "read_gbps": num_bytes / read_s / 1e9})
                print(f"  {rows[-1]}", flush=True)
    finally:
        if os.path.exists(path):
            os.remove(path)
    return rows


# ---- store SSD -----------------------------------------------------------------------------------


def _windowed(issue, count: int, in_flight: int) -> float:
    """Issue `count` moves keeping at most `in_flight` outstanding; returns the seconds for all."""
    window: collections.deque = collections.deque()
    start_s = time.perf_counter()
    for index in range(count):
        if len(window) == in_flight:
            window.popleft().result()
        window.append(issue(index))
    for future in window:
        future.result()
    return time.perf_counter() - start_s


def store_ssd(directory: str, backend: str, cell_bytes: int, block_sizes: list[int], in_flights: list[int], num_io_threads: int) -> list[dict]:
    rows = []
    with TieredStore(ssd_dir=directory, ssd_num_bytes=cell_bytes, backend=backend, num_io_threads=num_io_threads) as store:
        for block_bytes in block_sizes:
            count = cell_bytes // block_bytes
            extents = [store.empty((block_bytes,), torch.uint8, "ssd") for _ in range(count)]
            for in_flight in in_flights:
                buffers = [store.empty((block_bytes,), torch.uint8, "cpu") for _ in range(in_flight)]
                for buffer in buffers:
                    buffer.random_(0, 256)
                write_s = _windowed(lambda i: store.copy(extents[i], buffers[i % in_flight]), count, in_flight)
                drop_page_cache(store.swap.path)
                read_s = _windowed(lambda i: store.copy(buffers[i % in_flight], extents[i]), count, in_flight)
                rows.append({
                    "backend": store.backend.name, "block_MiB": block_bytes / MiB, "in_flight": in_flight,
                    "num_bytes": count * block_bytes, "write_gbps": count * block_bytes / write_s / 1e9, "read_gbps": count * block_bytes / read_s / 1e9,
                })
                print(f"  {rows[-1]}", flush=True)
                for buffer in buffers:
                    store.free(buffer)
            for extent in extents:
                store.free(extent)
        rows[-1]["direct"] = store.swap.direct
        if backend == "kvikio":
            rows[-1]["kvikio_compat_mode"] = store.backend.compat_mode
    return rows


# ---- PCIe ----------------------------------------------------------------------------------------


def _gbps_events(fn, num_bytes: int, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return num_bytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9


def _gbps_wall(fn, num_bytes: int, repeats: int) -> float:
    fn()
    start_s = time.perf_counter()
    for _ in range(repeats):
        fn()
    return num_bytes * repeats / (time.perf_counter() - start_s) / 1e9


def store_pcie(block_bytes: int, repeats: int) -> list[dict]:
    bare_gpu = torch.empty(block_bytes, dtype=torch.uint8, device="cuda")
    bare_pinned = torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True).random_(0, 256)
    rows = []
    with TieredStore() as store:
        # Two of each, used in turn, as the runtime double-buffers: a copy into one buffer must wait
        # for the previous copy into the same buffer (the store's ordering), not for every copy.
        hosts = [store.empty((block_bytes,), torch.uint8, "cpu").random_(0, 256) for _ in range(2)]
        gpus = [store.empty((block_bytes,), torch.uint8, "gpu") for _ in range(2)]
        # The bare copies are timed with events; the store's number includes its futures, waiter
        # threads and a wall clock.
        bare_h2d = _gbps_events(lambda: bare_gpu.copy_(bare_pinned, non_blocking=True), block_bytes, repeats)
        bare_d2h = _gbps_events(lambda: bare_pinned.copy_(bare_gpu, non_blocking=True), block_bytes, repeats)
        store_h2d = _gbps_wall(lambda: _all([store.copy(gpus[i % 2], hosts[i % 2]) for i in range(repeats)]), block_bytes * repeats, 1)
        store_d2h = _gbps_wall(lambda: _all([store.copy(hosts[i % 2], gpus[i % 2]) for i in range(repeats)]), block_bytes * repeats, 1)
        rows.append({"direction": "h2d", "block_MiB": block_bytes / MiB, "bare_gbps": bare_h2d, "store_gbps": store_h2d})
        rows.append({"direction": "d2h", "block_MiB": block_bytes / MiB, "bare_gbps": bare_d2h, "store_gbps": store_d2h})
    return rows


def _all(futures) -> None:
    for future in futures:
        future.result()


# ---- SSD -> GPU and concurrency ------------------------------------------------------------------


def ssd_to_gpu(directory: str, backend: str, cell_bytes: int, block_bytes: int, in_flight: int, num_io_threads: int) -> dict:
    """SSD -> GPU against SSD -> CPU with the same blocks, in flight count and extents, back to back,
    so the ratio shows the cost of the extra H2D leg (or of kvikio's device path), not disk noise."""
    with TieredStore(ssd_dir=directory, ssd_num_bytes=cell_bytes, backend=backend, num_io_threads=num_io_threads) as store:
        count = cell_bytes // block_bytes
        extents = [store.empty((block_bytes,), torch.uint8, "ssd") for _ in range(count)]
        source = store.empty((block_bytes,), torch.uint8, "gpu").random_(0, 256)
        gpus = [store.empty((block_bytes,), torch.uint8, "gpu") for _ in range(in_flight)]
        hosts = [store.empty((block_bytes,), torch.uint8, "cpu") for _ in range(in_flight)]
        write_s = _windowed(lambda i: store.copy(extents[i], source), count, in_flight)
        rows = {"backend": store.backend.name, "block_MiB": block_bytes / MiB, "in_flight": in_flight, "gpu_to_ssd_gbps": count * block_bytes / write_s / 1e9}
        for repeat in range(2):  # alternate to spread the disk's drift over both
            drop_page_cache(store.swap.path)
            cpu_s = _windowed(lambda i: store.copy(hosts[i % in_flight], extents[i]), count, in_flight)
            drop_page_cache(store.swap.path)
            gpu_s = _windowed(lambda i: store.copy(gpus[i % in_flight], extents[i]), count, in_flight)
            rows[f"ssd_to_cpu_gbps_{repeat}"] = count * block_bytes / cpu_s / 1e9
            rows[f"ssd_to_gpu_gbps_{repeat}"] = count * block_bytes / gpu_s / 1e9
        assert torch.equal(gpus[0], source) and torch.equal(hosts[0], source.cpu())
        rows["ssd_to_cpu_gbps"] = sum(rows[f"ssd_to_cpu_gbps_{r}"] for r in range(2)) / 2
        rows["ssd_to_gpu_gbps"] = sum(rows[f"ssd_to_gpu_gbps_{r}"] for r in range(2)) / 2
        print(f"  {rows}", flush=True)
        return rows


def concurrent(directory: str, backend: str, cell_bytes: int, block_bytes: int, in_flight: int, num_io_threads: int, pcie_block_bytes: int, num_repeats: int) -> list[dict]:
    """Disk and PCIe streams alone, then together, on separate buffers (they share only the store)."""
    rows = []
    with TieredStore(ssd_dir=directory, ssd_num_bytes=cell_bytes, backend=backend, num_io_threads=num_io_threads) as store:
        count = cell_bytes // block_bytes
        extents = [store.empty((block_bytes,), torch.uint8, "ssd") for _ in range(count)]
        buffers = [store.empty((block_bytes,), torch.uint8, "cpu") for _ in range(in_flight)]
        hosts = [store.empty((pcie_block_bytes,), torch.uint8, "cpu") for _ in range(2)]
        gpus = [store.empty((pcie_block_bytes,), torch.uint8, "gpu") for _ in range(2)]
        _windowed(lambda i: store.copy(extents[i], buffers[i % in_flight]), count, in_flight)
        for disk_kind, pcie_kind in (("read", "h2d"), ("write", "d2h")):

            def disk_leg():
                if disk_kind == "read":
                    drop_page_cache(store.swap.path)
                    return _windowed(lambda i: store.copy(buffers[i % in_flight], extents[i]), count, in_flight)
                return _windowed(lambda i: store.copy(extents[i], buffers[i % in_flight]), count, in_flight)

            def pcie_leg(num_copies):
                if pcie_kind == "h2d":
                    return _windowed(lambda i: store.copy(gpus[i % 2], hosts[i % 2]), num_copies, 2)
                return _windowed(lambda i: store.copy(hosts[i % 2], gpus[i % 2]), num_copies, 2)

            disk_s = disk_leg()
            probe_s = pcie_leg(8)
            num_copies = max(8, round(8 * disk_s / probe_s))  # a PCIe stream as long as the disk one
            repeats = []
            for _ in range(num_repeats):  # the disk drifts by 10-20% between passes: median of several
                disk_s, pcie_s = disk_leg(), pcie_leg(num_copies)
                together = {}
                threads = [
                    threading.Thread(target=lambda: together.__setitem__("disk_s", disk_leg())),
                    threading.Thread(target=lambda: together.__setitem__("pcie_s", pcie_leg(num_copies))),
                ]
                start_s = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                both_s = time.perf_counter() - start_s
                repeats.append({
                    "disk_alone_gbps": count * block_bytes / disk_s / 1e9, "pcie_alone_gbps": num_copies * pcie_block_bytes / pcie_s / 1e9,
                    "disk_together_gbps": count * block_bytes / together["disk_s"] / 1e9, "pcie_together_gbps": num_copies * pcie_block_bytes / together["pcie_s"] / 1e9,
                    "slower_alone_s": max(disk_s, pcie_s), "together_s": both_s, "ratio": max(disk_s, pcie_s) / both_s,
                })
            median = sorted(repeats, key=lambda r: r["ratio"])[len(repeats) // 2]
            rows.append({"legs": f"ssd {disk_kind} + {pcie_kind}", "backend": store.backend.name, **median, "ratios": [r["ratio"] for r in repeats]})
            print(f"  {rows[-1]}", flush=True)
    return rows


# ---- report --------------------------------------------------------------------------------------


def summarize(results: dict) -> tuple[list[dict], str]:
    """Goal ratios and the Markdown table."""
    raw_write = max((row["write_gbps"] for row in results["raw_dd"]), default=float("nan"))
    raw_read = max((row["read_gbps"] for row in results["raw_dd"]), default=float("nan"))
    dd_blocks = ", ".join(sorted({f"{row['block_MiB']:g}" for row in results["raw_dd"]}, key=float))
    dd_jobs = ", ".join(sorted({str(row["num_jobs"]) for row in results["raw_dd"]}, key=int))
    lines = [
        "| measurement | measured | reference | ratio | goal |",
        "|---|---|---|---|---|",
        f"| raw dd O_DIRECT, best of {dd_blocks} MiB blocks x {dd_jobs} parallel jobs | write {raw_write:.2f} / read {raw_read:.2f} GB/s | | | |",
    ]
    goals = []

    def add(name, measured, reference, goal, unit="GB/s"):
        ratio = measured / reference if reference else float("nan")
        goals.append({"name": name, "measured": measured, "reference": reference, "ratio": ratio, "goal": goal, "met": bool(ratio >= goal)})
        lines.append(f"| {name} | {measured:.2f} {unit} | {reference:.2f} {unit} | {ratio:.2f} | >= {goal} {'met' if ratio >= goal else 'MISSED'} |")

    by_backend = collections.defaultdict(list)
    for row in results["store_ssd"]:
        by_backend[row["backend"]].append(row)
    for backend, rows in by_backend.items():
        for direction, raw in (("write", raw_write), ("read", raw_read)):
            best = max(rows, key=lambda r: r[f"{direction}_gbps"])
            add(f"store SSD {direction}, {backend} (best: {best['block_MiB']:g} MiB x {best['in_flight']} in flight) vs raw dd", best[f"{direction}_gbps"], raw, 0.9)
    for row in results.get("store_pcie", []):
        add(f"store {row['direction']} {row['block_MiB']:g} MiB vs bare pinned copy_", row["store_gbps"], row["bare_gbps"], 0.9)
    for row in results.get("ssd_to_gpu", []):
        add(f"SSD -> GPU through store, {row['backend']} vs SSD -> CPU ({row['block_MiB']:g} MiB x {row['in_flight']})", row["ssd_to_gpu_gbps"], row["ssd_to_cpu_gbps"], 0.9)
    for row in results.get("concurrent", []):
        add(f"{row['legs']} at once ({row['backend']}): slower leg alone / together, median of {len(row['ratios'])}", row["slower_alone_s"], row["together_s"], 0.9, unit="s")
    lines += [f"| ERROR {error} | | | | |" for error in results["errors"]]
    return goals, "\n".join(lines)


def grid_table(results: dict) -> str:
    lines = ["| backend | block MiB | in flight | write GB/s | read GB/s |", "|---|---|---|---|---|"]
    for row in results["store_ssd"]:
        lines.append(f"| {row['backend']} | {row['block_MiB']:g} | {row['in_flight']} | {row['write_gbps']:.2f} | {row['read_gbps']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="io-bench-scratch", help="directory on the disk under test (files are removed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU machine")
    parser.add_argument("--json", default=None, help="where to write results (default benchmarks/results/io-<date>-<device>.json)")
    parser.add_argument("--backends", default="auto", help="comma list of posix,kvikio; auto: posix plus kvikio where it loads")
    parser.add_argument("--io-threads", type=int, default=16)
    args = parser.parse_args(argv)

    has_cuda = torch.cuda.is_available()
    backends = ["posix"] + (["kvikio"] if kvikio_importable() else []) if args.backends == "auto" else args.backends.split(",")
    if args.quick:
        dd_bytes, cell_bytes, blocks, in_flights, pcie_bytes = 32 * MiB, 32 * MiB, [1 * MiB, 4 * MiB], [1, 4], 16 * MiB
    else:
        dd_bytes, cell_bytes, blocks, in_flights, pcie_bytes = 2048 * MiB, 1024 * MiB, [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB], [1, 4, 16], 256 * MiB
    os.makedirs(args.dir, exist_ok=True)
    device = torch.cuda.get_device_name() if has_cuda else platform.processor() or "cpu"
    results: dict = {
        "date": datetime.date.today().isoformat(), "device": device, "command": "python -m benchmarks.io " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "torch": torch.__version__, "backends": backends, "io_threads": args.io_threads,
        "filesystem": subprocess.run(["df", "-T", args.dir], capture_output=True, text=True).stdout.strip().splitlines()[-1],
    }
    results["errors"] = []

    def case(name: str, fn):
        """Run one case; a failure is recorded and the remaining cases still run (device time is scarce)."""
        print(name, flush=True)
        try:
            return fn()
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            results["errors"].append(f"{name}: {error!r}")
            return []

    results["raw_dd"] = case(f"raw_dd ({dd_bytes / MiB:g} MiB per cell)", lambda: raw_dd(args.dir, dd_bytes, blocks, [1, 8]))
    results["store_ssd"] = []
    for backend in backends:
        results["store_ssd"] += case(
            f"store_ssd {backend} ({cell_bytes / MiB:g} MiB per cell)",
            lambda: store_ssd(args.dir, backend, cell_bytes, blocks, in_flights, args.io_threads),
        )
    if has_cuda:
        results["store_pcie"] = case("store_pcie", lambda: store_pcie(pcie_bytes, 16 if not args.quick else 4))
        results["ssd_to_gpu"], results["concurrent"] = [], []
        for backend in backends:
            results["ssd_to_gpu"] += case(f"ssd_to_gpu {backend}", lambda: [ssd_to_gpu(args.dir, backend, cell_bytes, blocks[-1], 8, args.io_threads)])
            results["concurrent"] += case(f"concurrent {backend}", lambda: concurrent(args.dir, backend, cell_bytes, blocks[-1], 8, args.io_threads, pcie_bytes, 1 if args.quick else 3))
    goals, table = summarize(results)
    results["goals"] = goals
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = args.json or os.path.join(os.path.dirname(__file__), "results", f"io-{results['date']}-{slug}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        json.dump(results, file, indent=1)
    try:
        os.rmdir(args.dir)
    except OSError:
        pass
    print(f"\nwrote {path}\n\n## store SSD grid\n{grid_table(results)}\n\n## goals ({device}, {results['date']})\n{table}", flush=True)
    return results


if __name__ == "__main__":
    main()
