"""I/O benchmark of the tiered store: disk, PCIe, and both at once, against the issue 3 goals.

    python -m benchmarks.io --dir /path/on/the/ssd          # on the GPU machine (about 3 minutes)
    python -m benchmarks.io --quick --dir /tmp/io-bench      # on a CPU-only machine, tiny sizes

Named cases, each writing its rows into one JSON file (saved after every case):
- `raw_dd`: the disk by an independent method, `dd` with oflag/iflag=direct at 1-64 MiB blocks
  (queue depth 1).
- `store_ssd`: store write (CPU -> SSD) and read (SSD -> CPU) bandwidth over 1-64 MiB blocks and
  1-16 requests in flight, per backend (posix; kvikio when importable). Buffers are the store's own
  pinned tensors, so no staging copy; each read pass first drops the file from the page cache.
- `store_pcie`: H2D and D2H through `store.copy` against a bare pinned `tensor.copy_` at 16 and
  256 MiB, 5 interleaved passes each (median and spread), with two controls: the bare copy on the
  store's own host buffers, and the store with spinning waiters (see `store_pcie`).
- `ssd_to_gpu`: SSD -> GPU through the store (posix: staged through pinned memory; kvikio: into
  device memory directly), the path the runtime uses to fetch parameters.
- `concurrent`: an SSD read stream and an H2D stream at once (and SSD write with D2H), each sized to
  take about as long as the other alone; every disk leg (dd, each backend) beside every PCIe leg
  (bare, store), to tell the machine's own contention from our code's (see `concurrent`).

Goals (issue 3): store SSD >= 0.9 x raw dd (best block size each), store PCIe >= 0.9 x bare copy,
concurrent time <= 1.1 x the slower leg alone (read as slower alone / together >= 0.9). The
Markdown tables are printed last. Set FUYOU_COMMIT to record the commit (the device machine's copy
of the tree has no .git).

What it does not measure: GPUDirect Storage proper (the GPU machine is a VM without nvidia-fs, so
kvikio runs its POSIX path), random-offset I/O, and more than one disk.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
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


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "values": values}


def _idle_s(events) -> float:
    """Seconds, between the first leg's issue and the last one's completion, with no leg outstanding."""
    events = sorted(events, key=lambda event: event.start_s)
    idle_s, reach_s = 0.0, events[0].end_s
    for event in events[1:]:
        idle_s += max(0.0, event.start_s - reach_s)
        reach_s = max(reach_s, event.end_s)
    return idle_s


def _mean_in_flight(events) -> float:
    """Legs outstanding on average over the span of `events` (the queue depth the store kept up)."""
    span_s = max(event.end_s for event in events) - min(event.start_s for event in events)
    return sum(event.end_s - event.start_s for event in events) / span_s


def _bare_copies(dsts: list, srcs: list, num_copies: int, stream) -> None:
    """`copy_` alternating over two buffers, all queued at once on `stream`, then one wait.

    No Python runs while the copies do. The wait sleeps (blocking event) rather than spins, so a
    concurrent leg beside it sees an idle CPU. Without CUDA: plain host copies."""
    if stream is None:
        for index in range(num_copies):
            dsts[index % 2].copy_(srcs[index % 2])
        return
    with torch.cuda.stream(stream):
        for index in range(num_copies):
            dsts[index % 2].copy_(srcs[index % 2], non_blocking=True)
        done = torch.cuda.Event(blocking=True)
        done.record()
    done.synchronize()


class GilProbe:
    """A thread that sleeps 1 ms at a time and records how late it wakes up.

    Waking needs the GIL, so the lateness is the wait for it (plus the OS's timer slack, which the
    same probe on an idle process shows): a direct measure of how much Python the other threads run.
    """

    def __init__(self) -> None:
        self.lateness_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            start_s = time.perf_counter()
            time.sleep(1e-3)
            self.lateness_s.append(time.perf_counter() - start_s - 1e-3)

    def __enter__(self) -> "GilProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def p99_ms(self) -> float:
        return statistics.quantiles(self.lateness_s, n=100)[98] * 1e3 if len(self.lateness_s) > 1 else float("nan")


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) of `fn()`."""
    start_s, start_cpu_s = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start_s, time.process_time() - start_cpu_s


def store_pcie(block_sizes: list[int], pass_bytes: int, num_repeats: int) -> list[dict]:
    """H2D and D2H: bare `copy_` against `store.copy`, interleaved passes, median and spread.

    A pass moves `pass_bytes` in copies of one block size between two host and two device buffers
    used in turn (as the runtime double-buffers), all issued at once, timed on the wall clock from
    the first issue to the last completion, the same way for every variant:
    - `bare`: `copy_` between torch pinned memory (cudaHostAlloc) and the GPU on a side stream;
    - `bare_registered`: the same on the store's own host buffers (cudaHostRegister), which
      separates how the pages are locked from the store's code;
    - `store`: `store.copy` on those buffers, completed through futures by the waiter threads;
      `store_spin`: the same with spinning waiters (CUDA's default; see `offload.streams`).
    CPU seconds per pass (every thread of the process) show spinning; the store's trace gives the
    time no copy was outstanding (`idle_ms`) and the latency from one copy's completion to the
    issue of the copy that waited on it (`reissue_us`: waiter wake-up plus Python).
    """
    has_cuda = torch.cuda.is_available()
    device_tier = "gpu" if has_cuda else "cpu"
    stream = torch.cuda.Stream() if has_cuda else None
    rows = []
    with TieredStore(trace=True) as store:
        for block_bytes in block_sizes:
            num_copies = max(8, pass_bytes // block_bytes)
            hosts = [store.empty((block_bytes,), torch.uint8, "cpu").random_(0, 256) for _ in range(2)]
            devices = [store.empty((block_bytes,), torch.uint8, device_tier) for _ in range(2)]
            bare_hosts = [torch.empty(block_bytes, dtype=torch.uint8, pin_memory=has_cuda).random_(0, 256) for _ in range(2)]
            for direction in ("h2d", "d2h"):

                def moves(dsts, srcs):
                    return (dsts, srcs) if direction == "h2d" else (srcs, dsts)

                def store_pass(spin: bool) -> dict:
                    store.copies.spin_wait = spin
                    first = len(store.trace)
                    dsts, srcs = moves(devices, hosts)
                    wall_s, cpu_s = _timed(lambda: _all([store.copy(dsts[i % 2], srcs[i % 2]) for i in range(num_copies)]))
                    store.copies.spin_wait = False
                    legs = sorted(store.trace[first:], key=lambda event: event.start_s)
                    reissue_s = [legs[i].start_s - legs[i - 2].end_s for i in range(2, len(legs))]
                    return {"wall_s": wall_s, "cpu_s": cpu_s, "idle_ms": _idle_s(legs) * 1e3, "reissue_us": statistics.median(reissue_s) * 1e6}

                variants = {
                    "bare": lambda: dict(zip(("wall_s", "cpu_s"), _timed(lambda: _bare_copies(*moves(devices, bare_hosts), num_copies, stream)))),
                    "bare_registered": lambda: dict(zip(("wall_s", "cpu_s"), _timed(lambda: _bare_copies(*moves(devices, hosts), num_copies, stream)))),
                    "store": lambda: store_pass(spin=False),
                    "store_spin": lambda: store_pass(spin=True),
                }
                passes = collections.defaultdict(list)
                for fn in variants.values():  # warm-up: first-touch, event creation
                    fn()
                for _ in range(num_repeats):  # interleaved, so drift hits every variant alike
                    for name, fn in variants.items():
                        passes[name].append(fn())
                row = {"direction": direction, "block_MiB": block_bytes / MiB, "num_copies": num_copies}
                for name, results in passes.items():
                    row[f"{name}_gbps"] = _stats([num_copies * block_bytes / r["wall_s"] / 1e9 for r in results])
                    row[f"{name}_cpu_s"] = statistics.median(r["cpu_s"] for r in results)
                    for key in ("idle_ms", "reissue_us"):
                        if key in results[0]:
                            row[f"{name}_{key}"] = statistics.median(r[key] for r in results)
                row["bare_gbps_median"], row["store_gbps_median"] = row["bare_gbps"]["median"], row["store_gbps"]["median"]
                rows.append(row)
                print(f"  {_brief(row)}", flush=True)
            for tensor in hosts + devices:
                store.free(tensor)
    return rows


def _brief(row: dict) -> dict:
    """A row for the log: medians only."""
    return {key: round(value["median"], 2) if isinstance(value, dict) else value for key, value in row.items() if not key.endswith("_median")}


def _all(futures) -> None:
    for future in futures:
        future.result()


# ---- SSD -> GPU and concurrency ------------------------------------------------------------------


def ssd_to_gpu(directory: str, backend: str, cell_bytes: int, block_bytes: int, in_flight: int, num_io_threads: int, num_repeats: int) -> dict:
    """SSD -> GPU against SSD -> CPU with the same blocks, in flight count and extents, alternating,
    so the ratio (of medians) shows the cost of the extra H2D leg (or of kvikio's device path), not
    disk noise: two alternations were not enough (one SSD -> CPU pass 1.94, the next 1.30 GB/s)."""
    with TieredStore(ssd_dir=directory, ssd_num_bytes=cell_bytes, backend=backend, num_io_threads=num_io_threads) as store:
        count = cell_bytes // block_bytes
        extents = [store.empty((block_bytes,), torch.uint8, "ssd") for _ in range(count)]
        source = store.empty((block_bytes,), torch.uint8, "gpu").random_(0, 256)
        gpus = [store.empty((block_bytes,), torch.uint8, "gpu") for _ in range(in_flight)]
        hosts = [store.empty((block_bytes,), torch.uint8, "cpu") for _ in range(in_flight)]
        write_s = _windowed(lambda i: store.copy(extents[i], source), count, in_flight)
        rows = {"backend": store.backend.name, "block_MiB": block_bytes / MiB, "in_flight": in_flight, "gpu_to_ssd_gbps": count * block_bytes / write_s / 1e9}
        passes = collections.defaultdict(list)
        for _ in range(num_repeats):  # alternate to spread the disk's drift over both
            drop_page_cache(store.swap.path)
            passes["cpu"].append(count * block_bytes / _windowed(lambda i: store.copy(hosts[i % in_flight], extents[i]), count, in_flight) / 1e9)
            drop_page_cache(store.swap.path)
            passes["gpu"].append(count * block_bytes / _windowed(lambda i: store.copy(gpus[i % in_flight], extents[i]), count, in_flight) / 1e9)
        assert torch.equal(gpus[0], source) and torch.equal(hosts[0], source.cpu())
        rows["ssd_to_cpu_gbps"], rows["ssd_to_gpu_gbps"] = _stats(passes["cpu"]), _stats(passes["gpu"])
        print(f"  {_brief(rows)}", flush=True)
        return rows


def concurrent(directory: str, backends: list[str], cell_bytes: int, block_bytes: int, in_flight: int, num_io_threads: int, pcie_block_bytes: int, num_repeats: int) -> list[dict]:
    """Disk and PCIe streams alone and together, interleaved passes, medians.

    Disk legs (1 pass = `cell_bytes`, 8 requests in flight): `dd` (8 processes with O_DIRECT, no
    Python at all) and the store, per backend. PCIe legs, sized to take as long as the disk leg:
    `bare` (all copies queued at once on a side stream, no Python while they run), `store`
    (`store.copy` on two buffers in turn, a window of 2, as the runtime double-buffers) and
    `store_spin` (the same with spinning waiters, CUDA's default). Every disk leg runs alone and
    beside each PCIe leg, one after another in each repeat, so the pairs separate the causes of a
    slowdown:
    - dd + bare: the machine itself (host memory, PCIe, the virtual disk), none of our code;
    - posix + bare against dd + bare: the posix backend's Python threads (the GIL);
    - posix + store against posix + bare: the store's PCIe-side Python and waiter threads;
    - store_spin against store: two waiter threads spinning on cores the disk's threads need.
    A probe thread's wake-up lateness (`GilProbe`) measures the GIL wait directly.
    The store's trace of each pass gives the mean requests in flight per leg kind, which tells a
    store that stopped issuing (fewer in flight) from a device that slowed down (as many in flight,
    each taking longer).
    """
    has_cuda = torch.cuda.is_available()
    device_tier = "gpu" if has_cuda else "cpu"
    stream = torch.cuda.Stream() if has_cuda else None
    count = cell_bytes // block_bytes
    dd_path = os.path.join(directory, "dd-concurrent.bin")
    rows = []
    with contextlib.ExitStack() as stack:
        stores = {}
        for backend in backends:
            store = stack.enter_context(TieredStore(ssd_dir=directory, ssd_num_bytes=cell_bytes, backend=backend, num_io_threads=num_io_threads, trace=True))
            extents = [store.empty((block_bytes,), torch.uint8, "ssd") for _ in range(count)]
            buffers = [store.empty((block_bytes,), torch.uint8, "cpu").random_(0, 256) for _ in range(in_flight)]
            hosts = [store.empty((pcie_block_bytes,), torch.uint8, "cpu").random_(0, 256) for _ in range(2)]
            devices = [store.empty((pcie_block_bytes,), torch.uint8, device_tier) for _ in range(2)]
            _windowed(lambda i: store.copy(extents[i], buffers[i % in_flight]), count, in_flight)
            stores[backend] = (store, extents, buffers, hosts, devices)
        stack.callback(lambda: os.path.exists(dd_path) and os.remove(dd_path))
        dd_jobs = [[f"bs={block_bytes}", f"count={count // 8}", f"seek={job * (count // 8)}"] for job in range(8)]
        _dd_parallel([["if=/dev/zero", f"of={dd_path}", *job, "oflag=direct", "conv=notrunc"] for job in dd_jobs])
        first = backends[0]  # its store's PCIe buffers serve the bare and dd pairs

        for disk_kind, pcie_kind in (("read", "h2d"), ("write", "d2h")):

            def disk_leg(name: str) -> float:
                if name == "dd":
                    if disk_kind == "read":
                        drop_page_cache(dd_path)
                        return _dd_parallel([[f"if={dd_path}", "of=/dev/null", *[a.replace("seek", "skip") for a in job], "iflag=direct"] for job in dd_jobs])
                    return _dd_parallel([["if=/dev/zero", f"of={dd_path}", *job, "oflag=direct", "conv=notrunc"] for job in dd_jobs])
                store, extents, buffers, _, _ = stores[name]
                if disk_kind == "read":
                    drop_page_cache(store.swap.path)
                    return _windowed(lambda i: store.copy(buffers[i % in_flight], extents[i]), count, in_flight)
                return _windowed(lambda i: store.copy(extents[i], buffers[i % in_flight]), count, in_flight)

            def pcie_leg(name: str, backend: str, num_copies: int) -> float:
                store, _, _, hosts, devices = stores[backend]
                dsts, srcs = (devices, hosts) if pcie_kind == "h2d" else (hosts, devices)
                if name == "bare":
                    return _timed(lambda: _bare_copies(dsts, srcs, num_copies, stream))[0]
                store.copies.spin_wait = name == "store_spin"
                try:
                    return _windowed(lambda i: store.copy(dsts[i % 2], srcs[i % 2]), num_copies, 2)
                finally:
                    store.copies.spin_wait = False

            def together(disk: str, pcie: str, backend: str, num_copies: int) -> dict:
                store = stores[backend][0]
                first_event = len(store.trace)
                seconds = {}
                threads = [
                    threading.Thread(target=lambda: seconds.__setitem__("disk_s", disk_leg(disk))),
                    threading.Thread(target=lambda: seconds.__setitem__("pcie_s", pcie_leg(pcie, backend, num_copies))),
                ]
                with GilProbe() as probe:
                    start_s = time.perf_counter()
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    seconds["both_s"] = time.perf_counter() - start_s
                seconds["gil_p99_ms"] = probe.p99_ms()
                events = store.trace[first_event:]
                for kind in ("ssd_" + disk_kind, pcie_kind):
                    legs = [event for event in events if event.kind == kind]
                    if legs:
                        seconds[f"{kind}_in_flight"] = _mean_in_flight(legs)
                return seconds

            def alone(backend: str, fn) -> dict:
                """Seconds, CPU seconds, requests in flight and GIL wait of one leg run alone."""
                store = stores[backend][0]
                first_event = len(store.trace)
                with GilProbe() as probe:
                    seconds, cpu_s = _timed(fn)
                legs = [event for event in store.trace[first_event:] if event.kind in ("ssd_" + disk_kind, pcie_kind)]
                return {"s": seconds, "cpu_s": cpu_s, "in_flight": _mean_in_flight(legs) if legs else float("nan"), "gil_p99_ms": probe.p99_ms()}

            probe_s = pcie_leg("store", first, 8)
            num_copies = max(8, round(8 * disk_leg(first) / probe_s))  # a PCIe stream about as long as the disk one
            pcie_legs = ("bare", "store", "store_spin")
            pairs = [("dd", pcie, first) for pcie in pcie_legs] + [(backend, pcie, backend) for backend in backends for pcie in pcie_legs]
            passes = collections.defaultdict(list)
            for _ in range(num_repeats):  # each pair's alone and together passes adjacent: the disk drifts 10-20%
                pcie_alone = {pcie: alone(first, lambda: pcie_leg(pcie, first, num_copies)) for pcie in pcie_legs}
                disk_alone = {}
                for disk, pcie, backend in pairs:
                    if disk not in disk_alone:
                        disk_alone[disk] = alone(backend, lambda: disk_leg(disk))
                    both = together(disk, pcie, backend, num_copies)
                    disk_s, pcie_s = disk_alone[disk]["s"], pcie_alone[pcie]["s"]
                    passes[(disk, pcie)].append({
                        "disk_alone_gbps": cell_bytes / disk_s / 1e9, "disk_together_gbps": cell_bytes / both["disk_s"] / 1e9,
                        "pcie_alone_gbps": num_copies * pcie_block_bytes / pcie_s / 1e9, "pcie_together_gbps": num_copies * pcie_block_bytes / both["pcie_s"] / 1e9,
                        "ratio": max(disk_s, pcie_s) / both["both_s"], "slower_alone_s": max(disk_s, pcie_s), "together_s": both["both_s"],
                        "disk_in_flight_alone": disk_alone[disk]["in_flight"], "disk_cpu_s_alone": disk_alone[disk]["cpu_s"],
                        "pcie_cpu_s_alone": pcie_alone[pcie]["cpu_s"], "gil_p99_ms_disk_alone": disk_alone[disk]["gil_p99_ms"],
                        **{key: value for key, value in both.items() if key.endswith("in_flight") or key.startswith("gil")},
                    })
            for (disk, pcie), results in passes.items():
                row = {"legs": f"ssd {disk_kind} + {pcie_kind}", "disk": disk, "pcie": pcie, "num_copies": num_copies}
                for key in results[0]:
                    row[key] = _stats([r[key] for r in results])
                row["slower_alone_s_median"], row["together_s_median"] = row["slower_alone_s"]["median"], row["together_s"]["median"]
                rows.append(row)
                print(f"  {_brief(row)}", flush=True)
    return rows


# ---- report --------------------------------------------------------------------------------------


def summarize(results: dict) -> tuple[list[dict], str]:
    """Goal ratios and the Markdown table."""
    raw_dd = results.get("raw_dd", [])
    raw_write = max((row["write_gbps"] for row in raw_dd), default=float("nan"))
    raw_read = max((row["read_gbps"] for row in raw_dd), default=float("nan"))
    dd_blocks = ", ".join(sorted({f"{row['block_MiB']:g}" for row in raw_dd}, key=float))
    dd_jobs = ", ".join(sorted({str(row["num_jobs"]) for row in raw_dd}, key=int))
    lines = [
        "| measurement | measured | reference | ratio | goal |",
        "|---|---|---|---|---|",
        f"| raw dd O_DIRECT, best of {dd_blocks} MiB blocks x {dd_jobs} parallel jobs | write {raw_write:.2f} / read {raw_read:.2f} GB/s | | | |",
    ]
    goals = []

    def add(name, measured, reference, goal, unit="GB/s", ratio=None):
        if ratio is None:
            ratio = measured / reference if reference else float("nan")
        goals.append({"name": name, "measured": measured, "reference": reference, "ratio": ratio, "goal": goal, "met": bool(ratio >= goal)})
        lines.append(f"| {name} | {measured:.2f} {unit} | {reference:.2f} {unit} | {ratio:.2f} | >= {goal} {'met' if ratio >= goal else 'MISSED'} |")

    by_backend = collections.defaultdict(list)
    for row in results.get("store_ssd", []):
        by_backend[row["backend"]].append(row)
    for backend, rows in by_backend.items():
        for direction, raw in (("write", raw_write), ("read", raw_read)):
            best = max(rows, key=lambda r: r[f"{direction}_gbps"])
            add(f"store SSD {direction}, {backend} (best: {best['block_MiB']:g} MiB x {best['in_flight']} in flight) vs raw dd", best[f"{direction}_gbps"], raw, 0.9)
    for row in results.get("store_pcie", []):
        store, bare = row["store_gbps"], row["bare_gbps"]
        spread = f"store {store['min']:.1f}-{store['max']:.1f}, bare {bare['min']:.1f}-{bare['max']:.1f}"
        add(f"store {row['direction']} {row['block_MiB']:g} MiB vs bare pinned copy_, median of {len(store['values'])} ({spread})", store["median"], bare["median"], 0.9)
    for row in results.get("ssd_to_gpu", []):
        gpu, cpu = row["ssd_to_gpu_gbps"], row["ssd_to_cpu_gbps"]
        if isinstance(gpu, dict):  # medians since the runs after 34ef25e; a mean of two before
            spread = f", median of {len(gpu['values'])} (GPU {gpu['min']:.2f}-{gpu['max']:.2f}, CPU {cpu['min']:.2f}-{cpu['max']:.2f})"
            gpu, cpu = gpu["median"], cpu["median"]
        else:
            spread = ", mean of 2"
        add(f"SSD -> GPU through store, {row['backend']} vs SSD -> CPU ({row['block_MiB']:g} MiB x {row['in_flight']}){spread}", gpu, cpu, 0.9)
    for row in results.get("concurrent", []):
        if row["disk"] != "dd" and row["pcie"] == "store":
            ratio = row["ratio"]
            add(
                f"{row['legs']} at once ({row['disk']}): slower leg alone / together, median of {len(ratio['values'])} ({ratio['min']:.2f}-{ratio['max']:.2f})",
                row["slower_alone_s_median"], row["together_s_median"], 0.9, unit="s", ratio=ratio["median"],
            )
    lines += [f"| ERROR {error} | | | | |" for error in results["errors"]]
    return goals, "\n".join(lines)


def grid_table(results: dict) -> str:
    lines = ["| backend | block MiB | in flight | write GB/s | read GB/s |", "|---|---|---|---|---|"]
    for row in results.get("store_ssd", []):
        lines.append(f"| {row['backend']} | {row['block_MiB']:g} | {row['in_flight']} | {row['write_gbps']:.2f} | {row['read_gbps']:.2f} |")
    return "\n".join(lines)


def pcie_table(results: dict) -> str:
    lines = [
        "| direction | block MiB | bare GB/s | bare on the store's buffers GB/s | store GB/s | store, spinning waiters GB/s | CPU s per pass: store / spinning | store idle ms | reissue us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results.get("store_pcie", []):
        cells = [f"{row[name + '_gbps']['median']:.1f} ({row[name + '_gbps']['min']:.1f}-{row[name + '_gbps']['max']:.1f})" for name in ("bare", "bare_registered", "store", "store_spin")]
        lines.append(
            f"| {row['direction']} | {row['block_MiB']:g} | {' | '.join(cells)} | {row['store_cpu_s']:.3f} / {row['store_spin_cpu_s']:.3f} "
            f"| {row['store_idle_ms']:.2f} | {row['store_reissue_us']:.0f} |"
        )
    return "\n".join(lines)


def concurrency_table(results: dict) -> str:
    """Every disk leg with every PCIe leg: medians (min-max) of the interleaved passes."""
    lines = [
        "| legs | disk | PCIe | disk alone GB/s | disk together GB/s | PCIe alone GB/s | PCIe together GB/s | slower alone / together "
        "| disk requests in flight alone / together | CPU s alone: disk / PCIe | GIL wait p99 ms: disk alone / together |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(stats, digits=2):
        return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"

    for row in results.get("concurrent", []):
        depth = row.get("ssd_read_in_flight", row.get("ssd_write_in_flight"))
        depth = f"{row['disk_in_flight_alone']['median']:.1f} / {depth['median']:.1f}" if depth else ""
        lines.append(
            f"| {row['legs']} | {row['disk']} | {row['pcie']} | {cell(row['disk_alone_gbps'])} | {cell(row['disk_together_gbps'])} "
            f"| {cell(row['pcie_alone_gbps'], 1)} | {cell(row['pcie_together_gbps'], 1)} | {cell(row['ratio'])} | {depth} "
            f"| {row['disk_cpu_s_alone']['median']:.3f} / {row['pcie_cpu_s_alone']['median']:.3f} "
            f"| {row['gil_p99_ms_disk_alone']['median']:.2f} / {row['gil_p99_ms']['median']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="io-bench-scratch", help="directory on the disk under test (files are removed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU machine")
    parser.add_argument("--json", default=None, help="where to write results (default benchmarks/results/io-<date>-<device>.json)")
    parser.add_argument("--backends", default="auto", help="comma list of posix,kvikio; auto: posix plus kvikio where it loads")
    parser.add_argument("--io-threads", type=int, default=16)
    parser.add_argument("--only", default=None, help="comma list of cases to run: store_pcie, concurrent, raw_dd, store_ssd, ssd_to_gpu (default: all)")
    args = parser.parse_args(argv)
    selected = set(args.only.split(",")) if args.only else None

    has_cuda = torch.cuda.is_available()
    backends = ["posix"] + (["kvikio"] if kvikio_importable() else []) if args.backends == "auto" else args.backends.split(",")
    if args.quick:
        dd_bytes, cell_bytes, blocks, in_flights, pcie_blocks, num_repeats = 32 * MiB, 32 * MiB, [1 * MiB, 4 * MiB], [1, 4], [1 * MiB, 4 * MiB], 2
    else:
        dd_bytes, cell_bytes, blocks, in_flights, pcie_blocks, num_repeats = 2048 * MiB, 1024 * MiB, [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB], [1, 4, 16], [16 * MiB, 256 * MiB], 5
    os.makedirs(args.dir, exist_ok=True)
    device = torch.cuda.get_device_name() if has_cuda else platform.processor() or "cpu"
    results: dict = {
        "date": datetime.date.today().isoformat(), "device": device, "commit": os.environ.get("FUYOU_COMMIT", "unknown"), "command": "python -m benchmarks.io " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "torch": torch.__version__, "backends": backends, "io_threads": args.io_threads,
        "filesystem": subprocess.run(["df", "-T", args.dir], capture_output=True, text=True).stdout.strip().splitlines()[-1],
    }
    results["errors"] = []
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = args.json or os.path.join(os.path.dirname(__file__), "results", f"io-{results['date']}-{slug}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def case(key: str, name: str, fn) -> None:
        """Run one case into results[key]; a failure is recorded and the remaining cases still run,
        and the JSON is saved after every case (device time is scarce: a timeout keeps what ran)."""
        if selected is not None and key not in selected:
            return
        print(name, flush=True)
        try:
            results.setdefault(key, []).extend(fn())
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            results["errors"].append(f"{name}: {error!r}")
        with open(path, "w") as file:
            json.dump(results, file, indent=1)

    # The cases with the unmet goals first. Without CUDA the PCIe legs run host-to-host, only to
    # check the code paths.
    case("store_pcie", "store_pcie", lambda: store_pcie(pcie_blocks, 16 * pcie_blocks[-1], num_repeats))
    case("concurrent", "concurrent", lambda: concurrent(args.dir, backends, cell_bytes, blocks[-1], 8, args.io_threads, pcie_blocks[-1], num_repeats))
    case("raw_dd", f"raw_dd ({dd_bytes / MiB:g} MiB per cell)", lambda: raw_dd(args.dir, dd_bytes, blocks, [1, 8]))
    for backend in backends:
        case("store_ssd", f"store_ssd {backend} ({cell_bytes / MiB:g} MiB per cell)", lambda: store_ssd(args.dir, backend, cell_bytes, blocks, in_flights, args.io_threads))
    results["ssd_to_gpu"] = []
    if has_cuda:
        for backend in backends:
            case("ssd_to_gpu", f"ssd_to_gpu {backend}", lambda: [ssd_to_gpu(args.dir, backend, cell_bytes, blocks[-1], 8, args.io_threads, num_repeats)])
    goals, table = summarize(results)
    results["goals"] = goals
    with open(path, "w") as file:
        json.dump(results, file, indent=1)
    try:
        os.rmdir(args.dir)
    except OSError:
        pass
    print(
        f"\nwrote {path}\n\n## store SSD grid\n{grid_table(results)}\n\n## PCIe, median (min-max) of {num_repeats}\n{pcie_table(results)}"
        f"\n\n## concurrency by cause\n{concurrency_table(results)}\n\n## goals ({device}, {results['date']})\n{table}",
        flush=True,
    )
    return results


if __name__ == "__main__":
    main()
