"""One DeepSpeed step as a `fuyou.timeline.Timeline`, so that the comparison draws both systems the same way.

DeepSpeed has no trace of its own moves, so the lanes come from three outside observers; every time is
`time.perf_counter()` seconds, as in fuyou.timeline:
    compute              CUDA kernels as torch.profiler (CUPTI) saw them run; kernels less than
                         `MERGE_GAP_S` apart are merged into one span, so a block's kernels are one bar.
    H2D, D2H, device copy
                         the profiler's memcpy events (when the copy engine ran them), with their bytes.
    SSD read, SSD write  DeepSpeed's aio handles: `AioTrace.install` wraps the aio op's handle constructor
                         before `deepspeed.initialize` creates the swappers' handles. A span runs from the
                         first `async_pread`/`async_pwrite` submitted on a handle to the `wait()` that
                         returned it: an upper bound on the disk's busy time where DeepSpeed waits late.
    CPU optimizer        `DeepSpeedCPUAdam.step` / `step_subgroup` calls (host time), named "update".
The profiler's clock is tied to perf_counter by a `record_function` annotation entered at a known
perf_counter time (`ANCHOR`). torch.profiler and the patched aio op are imported only when tracing.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager

from fuyou.timeline import Span

ANCHOR = "fuyou_timeline_anchor"
MERGE_GAP_S = 50e-6
LANES = ("compute", "H2D", "D2H", "SSD read", "SSD write", "CPU optimizer", "device copy")
MEMCPY_LANES = {"HtoD": "H2D", "DtoH": "D2H", "DtoD": "device copy"}


class _TracedHandle:
    """An aio handle that tells `AioTrace` what it submits and when its `wait()` returns; else the handle."""

    def __init__(self, handle, trace: AioTrace) -> None:
        self._handle, self._trace = handle, trace
        self._pending: dict[str, list] = {}  # lane -> [first submission s, bytes]

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def _submit(self, lane: str, buffer) -> None:
        if self._trace.recording:
            entry = self._pending.setdefault(lane, [time.perf_counter(), 0])
            entry[1] += buffer.numel() * buffer.element_size()

    def async_pread(self, buffer, *args):
        self._submit("SSD read", buffer)
        return self._handle.async_pread(buffer, *args)

    def async_pwrite(self, buffer, *args):
        self._submit("SSD write", buffer)
        return self._handle.async_pwrite(buffer, *args)

    def wait(self):
        completed = self._handle.wait()
        end_s = time.perf_counter()
        for lane, (start_s, num_bytes) in self._pending.items():
            self._trace.spans.append(Span(lane, "aio", start_s, end_s, num_bytes))
        self._pending = {}
        return completed


class AioTrace:
    """DeepSpeed's disk traffic and CPU Adam calls as spans while `recording` (module docstring)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.recording = False

    def install(self, *, disk: bool) -> None:
        """Wrap DeepSpeedCPUAdam's steps and, with `disk`, the aio handle constructor; before `deepspeed.initialize`."""
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if disk:
            from deepspeed.ops.op_builder import AsyncIOBuilder

            aio_module = AsyncIOBuilder().load(verbose=False)  # DeepSpeed caches the op: its swappers get this module
            make_handle = aio_module.aio_handle
            aio_module.aio_handle = lambda *args, **kwargs: _TracedHandle(make_handle(*args, **kwargs), self)
        for name in ("step", "step_subgroup"):
            setattr(DeepSpeedCPUAdam, name, self._timed(getattr(DeepSpeedCPUAdam, name)))

    def _timed(self, method):
        trace = self

        def timed(*args, **kwargs):
            if not trace.recording:
                return method(*args, **kwargs)
            start_s = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                trace.spans.append(Span("CPU optimizer", "update", start_s, time.perf_counter()))

        return timed


def profiler_spans(trace: dict, anchor_s: float) -> list[Span]:
    """Kernels and memcpys of a torch.profiler Chrome trace as spans on perf_counter time (module docstring).

    `anchor_s`: perf_counter when the `ANCHOR` annotation was entered.

    Raises:
        ValueError: the trace has no `ANCHOR` annotation.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    anchors = [e["ts"] for e in events if e.get("name") == ANCHOR]
    if not anchors:
        raise ValueError(f"the profiler trace has no {ANCHOR!r} annotation: cannot place it on the host clock")
    offset_s = anchor_s - anchors[0] / 1e6
    spans, kernels = [], []
    for event in events:
        start_s, end_s = offset_s + event["ts"] / 1e6, offset_s + (event["ts"] + event.get("dur", 0)) / 1e6
        category = event.get("cat", "")
        if category == "kernel":
            kernels.append((start_s, end_s))
        elif category == "gpu_memcpy":
            lane = next((lane for key, lane in MEMCPY_LANES.items() if key in event.get("name", "")), None)
            if lane is not None:
                kind = {"H2D": "h2d", "D2H": "d2h", "device copy": "d2d"}[lane]
                spans.append(Span(lane, kind, start_s, end_s, int(event.get("args", {}).get("bytes", 0))))
    merged: list[list[float]] = []
    for start_s, end_s in sorted(kernels):
        if merged and start_s - merged[-1][1] < MERGE_GAP_S:
            merged[-1][1] = max(merged[-1][1], end_s)
        else:
            merged.append([start_s, end_s])
    spans += [Span("compute", "kernels", start_s, end_s) for start_s, end_s in merged]
    return spans


@contextmanager
def profiled(aio: AioTrace | None):
    """Profile the block inside; yields a list that holds every span (profiler's and `aio`'s) afterwards."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    spans: list[Span] = []
    if aio is not None:
        aio.spans, aio.recording = [], True
    try:
        with profile(activities=activities) as profiler:
            with record_function(ANCHOR):
                anchor_s = time.perf_counter()
            yield spans
    finally:
        if aio is not None:
            aio.recording = False
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as file:
            spans += profiler_spans(json.load(file), anchor_s)
    if aio is not None:
        spans += aio.spans
