"""GPU kernel time of one call under torch.profiler, by kernel and by named group (benchmark diagnostics).

Shared by `benchmarks.qlora --profile` and `benchmarks.diag.halo_step`, each with its own groups: a list of
(group, lower-case name fragments), first match wins, anything unmatched is "elementwise and other".
"""

from __future__ import annotations

from typing import Callable

Groups = list[tuple[str, tuple[str, ...]]]


def profile_kernels(run: Callable[[], object], detail: dict | None = None) -> tuple[dict[str, float], float, int]:
    """Calls `run()` once under torch.profiler: (seconds per kernel name, seconds of copies and memsets,
    number of kernels). Copies and memsets are not kernels here; nor are the ranges the profiler annotates
    on the GPU timeline ("Optimizer.step#PagedAdamW.step" and the like: kernel names hold '#' too, in
    lambdas, "...::{lambda()#1}...", but always with parentheses).

    `detail`, when given, receives "calls" (launches per kernel name) and "gaps": the GPU's idle intervals
    between consecutive kernels and copies, as (microseconds idle, kernel before, kernel after), longest
    first, so that a step's idle time can be traced to what the host was doing."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        run()
    events = [e for e in profiler.events() if e.device_type == DeviceType.CUDA]
    copies = [e for e in events if e.name.startswith(("Memcpy", "Memset"))]
    kernels = [e for e in events if not e.name.startswith(("Memcpy", "Memset")) and not ("#" in e.name and "(" not in e.name)]
    by_name: dict[str, float] = {}
    for event in kernels:
        by_name[event.name] = by_name.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e6
    if detail is not None:
        calls: dict[str, int] = {}
        for event in kernels:
            calls[event.name] = calls.get(event.name, 0) + 1
        timeline = sorted(kernels + copies, key=lambda e: e.time_range.start)
        gaps, end_us = [], None
        for before, after in zip(timeline, timeline[1:]):
            end_us = before.time_range.end if end_us is None else max(end_us, before.time_range.end)
            if after.time_range.start > end_us:
                gaps.append((after.time_range.start - end_us, before.name, after.name))
        detail["calls"] = calls
        detail["gaps"] = sorted(gaps, key=lambda gap: -gap[0])
    return by_name, sum(e.time_range.elapsed_us() for e in copies) / 1e6, len(kernels)


def kernel_group(name: str, groups: Groups) -> str:
    """A kernel's group by its name; "elementwise and other" where no group's fragment matches."""
    lowered = name.lower()
    for group, fragments in groups:
        if any(fragment.lower() in lowered for fragment in fragments):
            return group
    return "elementwise and other"


def group_times(by_name: dict[str, float], groups: Groups) -> dict[str, float]:
    """Seconds per group, largest first."""
    totals: dict[str, float] = {}
    for name, seconds in by_name.items():
        group = kernel_group(name, groups)
        totals[group] = totals.get(group, 0.0) + seconds
    return dict(sorted(totals.items(), key=lambda item: -item[1]))
