"""One training step as lanes of spans: recorded from the runtime, drawn as a PNG, written as a Chrome trace.

Lanes (`LANES`) and where their spans come from; every time is `time.perf_counter()` seconds:
    compute        `ComputeTracer` spans the schedule opens around each block's forward, recompute and
                   backward (`FuyouSchedule.tracer`); on a GPU they are CUDA events on the compute
                   stream, converted to host time through one anchor event, because host timestamps of
                   asynchronous kernels say when they were queued, not when they ran; and around the
                   head with its loss and their backward ("head"). The embedding is not spanned. With
                   runtime=reference one span per step ("step").
    H2D, D2H, device copy
                   on a GPU, the copy streams' CUDA events around each copy (`CopyEngine.device_timings`),
                   converted like compute: when the copy ran, not when it was queued behind compute.
    SSD read, SSD write, host copy
                   the tiered store's `TraceEvent`s (one per leg of a move), from its issue to the host
                   seeing it complete: an SSD leg queued behind others starts early on the chart.
    CPU optimizer  `OffloadedAdamW.events`: its worker's accumulate, update, fix_up, publish and
                   state_wait (waiting for state from the SSD) tasks.

The Chrome trace (`chrome_trace`) is the JSON Trace Event Format that Perfetto (ui.perfetto.dev) and
chrome://tracing open: complete events ("ph": "X") with microsecond "ts" and "dur", one thread per lane.
matplotlib is imported only to draw.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

LANES = ("compute", "H2D", "D2H", "SSD read", "SSD write", "CPU optimizer", "host copy", "device copy")
STORE_LANES = {"h2d": "H2D", "d2h": "D2H", "ssd_read": "SSD read", "ssd_write": "SSD write", "h2h": "host copy", "d2d": "device copy"}
COLORS = {"forward": "tab:blue", "recompute": "tab:cyan", "backward": "tab:purple", "head": "goldenrod", "step": "tab:blue",
          "h2d": "tab:green", "d2h": "tab:olive", "ssd_read": "tab:orange", "ssd_write": "tab:red",
          "h2h": "tab:gray", "d2d": "tab:gray", "accumulate": "tab:brown", "update": "tab:pink",
          "fix_up": "tab:red", "publish": "tab:olive", "state_wait": "lightgray"}


@dataclass(frozen=True)
class Span:
    """One bar of the timeline: `name` on `lane` from `start_s` to `end_s` (perf_counter seconds)."""

    lane: str
    name: str
    start_s: float
    end_s: float
    num_bytes: int = 0


class ComputeTracer:
    """Spans of compute, opened by the schedule around block forwards, recomputes and backwards.

    Args:
        device: the compute device: CUDA events on a GPU, host timestamps on the CPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_gpu = device.type == "cuda"
        self._open: list[tuple[str, object, object]] = []  # (name, start, end): events or seconds
        self._anchor = None

    def anchor(self) -> None:
        """Pin CUDA event times to the host clock: call with the device idle, before the spans to convert."""
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            self._anchor = torch.cuda.Event(enable_timing=True)
            self._anchor.record()
            self._anchor_s = time.perf_counter()  # the idle stream reaches the event at once

    @contextmanager
    def span(self, kind: str, j: int | None):
        """Times the block (`kind` "forward", "recompute", "backward" of block `j`; "head" with j None)."""
        name = kind if j is None else f"{kind} {j}"
        if not self.on_gpu:
            start_s = time.perf_counter()
            yield
            self._open.append((name, start_s, time.perf_counter()))
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._open.append((name, start, end))

    def host_s(self, event: torch.cuda.Event) -> float:
        """A completed timing event of this device on the host clock (perf_counter seconds)."""
        assert self._anchor is not None, "anchor() the tracer before CUDA events are converted"
        return self._anchor_s + self._anchor.elapsed_time(event) / 1e3  # ms

    def spans(self) -> list[Span]:
        """Every span so far on the host clock (waits for the device)."""
        if not self.on_gpu:
            return [Span("compute", name, start, end) for name, start, end in self._open]
        torch.cuda.synchronize(self.device)
        return [Span("compute", name, self.host_s(start), self.host_s(end)) for name, start, end in self._open]


def store_spans(trace, origin_s: float, skip: tuple[str, ...] = ()) -> list[Span]:
    """The store's `TraceEvent`s (seconds since `origin_s`) as spans on the transfer lanes, but kinds in `skip`."""
    return [Span(STORE_LANES[e.kind], e.kind, origin_s + e.start_s, origin_s + e.end_s, e.num_bytes)
            for e in trace if e.kind not in skip]


def device_copy_spans(timings, tracer: ComputeTracer) -> list[Span]:
    """`CopyEngine.device_timings` (kind, start event, end event, bytes) as spans: when the copy streams ran them."""
    torch.cuda.synchronize(tracer.device)
    return [Span(STORE_LANES[kind], kind, tracer.host_s(start), tracer.host_s(end), num_bytes)
            for kind, start, end, num_bytes in timings]


def optimizer_spans(events) -> list[Span]:
    """`OffloadedAdamW.events` (kind, start_s, end_s) as spans on the CPU optimizer lane."""
    return [Span("CPU optimizer", kind, start_s, end_s) for kind, start_s, end_s in events]


class RuntimeTrace:
    """The Fuyou runtime's traces (module docstring), switched on for some steps and collected as spans.

    `start()` before the steps to trace (with the device idle: it anchors the CUDA clock), `stop()` once
    the work they queued is done (`Trainer.drain()`); `lanes(spans)` is the set of lanes this placement has.

    Args:
        runtime: a `fuyou.runtime.FuyouRuntime`.
    """

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.tracer = ComputeTracer(runtime.device)

    def start(self) -> None:
        runtime = self.runtime
        runtime.store.trace, runtime.optimizer.events, runtime.schedule.tracer = [], [], self.tracer
        if self.tracer.on_gpu:
            runtime.store.copies.device_timings = []
        self.tracer.anchor()

    def stop(self) -> list[Span]:
        """Every span since `start()`; the traces are off again."""
        runtime = self.runtime
        # On a GPU the copy streams' own times replace the store's issue-to-completion times of memory copies.
        device_kinds = ("h2d", "d2h", "d2d") if self.tracer.on_gpu else ()
        spans = self.tracer.spans() + store_spans(runtime.store.trace, runtime.store.trace_origin_s, skip=device_kinds)
        if self.tracer.on_gpu:
            spans += device_copy_spans(runtime.store.copies.device_timings, self.tracer)
            runtime.store.copies.device_timings = None
        spans += optimizer_spans(runtime.optimizer.events)
        runtime.store.trace, runtime.optimizer.events, runtime.schedule.tracer = None, None, None
        return spans

    def lanes(self, spans: list[Span]) -> tuple[str, ...]:
        """The lanes this placement has (even if idle in the traced steps), in `LANES` order."""
        present = {"compute", "CPU optimizer"} | {span.lane for span in spans}
        if self.tracer.on_gpu:
            present |= {"H2D", "D2H"}
        if self.runtime.placement.uses_ssd:
            present |= {"SSD read", "SSD write"}
        return tuple(lane for lane in LANES if lane in present)


@dataclass
class Timeline:
    """The spans that overlap one window (one step), clipped to it.

    Attributes:
        title: e.g. "step 5 of runtime=fuyou, gpt3-2.7b".
        start_s, end_s: the window, perf_counter seconds.
        spans: spans clipped to the window.
        lanes: the lanes this run can have (whether or not they had traffic in this window).
    """

    title: str
    start_s: float
    end_s: float
    spans: list[Span]
    lanes: tuple[str, ...]

    @classmethod
    def of(cls, spans: list[Span], start_s: float, end_s: float, lanes: tuple[str, ...], title: str) -> Timeline:
        clipped = [Span(s.lane, s.name, max(s.start_s, start_s), min(s.end_s, end_s), s.num_bytes)
                   for s in spans if s.end_s > start_s and s.start_s < end_s]
        # A lane with traffic is always drawn, even where the caller did not expect it.
        lanes = (*lanes, *sorted({s.lane for s in clipped} - set(lanes), key=lambda lane: (lane not in LANES, lane)))
        return cls(title, start_s, end_s, sorted(clipped, key=lambda s: s.start_s), lanes)

    def lane_summary(self) -> dict[str, dict]:
        """Per lane: spans, busy seconds (their union) and busy fraction of the window, bytes."""
        window_s = self.end_s - self.start_s
        out = {}
        for lane in self.lanes:
            spans = [s for s in self.spans if s.lane == lane]
            busy_s, covered_to = 0.0, self.start_s
            for s in spans:  # sorted by start: the union of the intervals
                if s.end_s > covered_to:
                    busy_s += s.end_s - max(s.start_s, covered_to)
                    covered_to = s.end_s
            out[lane] = {"spans": len(spans), "busy_s": busy_s, "busy_fraction": busy_s / window_s if window_s > 0 else 0.0,
                         "bytes": sum(s.num_bytes for s in spans)}
        return out


def chrome_trace(timeline: Timeline) -> dict:
    """The timeline in the Trace Event Format: one process, one thread per lane, times in µs from the window start."""
    tids = {lane: index + 1 for index, lane in enumerate(timeline.lanes)}
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": timeline.title}}]
    for lane, tid in tids.items():
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": lane}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "args": {"sort_index": tid}})
    for s in timeline.spans:
        event = {"name": s.name, "cat": s.lane, "ph": "X", "pid": 1, "tid": tids[s.lane],
                 "ts": (s.start_s - timeline.start_s) * 1e6, "dur": (s.end_s - s.start_s) * 1e6}
        if s.num_bytes:
            event["args"] = {"bytes": s.num_bytes}
        events.append(event)
    other = {"title": timeline.title, "window_s": timeline.end_s - timeline.start_s}
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def write_chrome_trace(timeline: Timeline, path: Path) -> None:
    Path(path).write_text(json.dumps(chrome_trace(timeline)))


def from_chrome_trace(trace: dict) -> Timeline:
    """The timeline a `chrome_trace` dict holds (times from its window start), e.g. to draw it elsewhere."""
    events = trace["traceEvents"]
    lanes = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [Span(lanes[e["tid"]], e["name"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, e.get("args", {}).get("bytes", 0))
             for e in events if e["ph"] == "X"]
    end_s = trace["otherData"].get("window_s", max((s.end_s for s in spans), default=0.0))
    return Timeline(trace["otherData"]["title"], 0.0, end_s, spans, tuple(lanes[tid] for tid in sorted(lanes)))


def write_png(timeline: Timeline, path: Path) -> None:
    """One row per lane, bars coloured by kind (forward, backward, h2d, update, ...), time in ms.

    Raises:
        ImportError: matplotlib is not installed (`python -m fuyou.timeline trace.json timeline.png`
            draws the PNG later, on a machine that has it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = list(timeline.lanes)
    summary = timeline.lane_summary()
    figure, axes = plt.subplots(figsize=(14, 0.6 * len(lanes) + 1.6))
    for row, lane in enumerate(lanes):
        spans = [s for s in timeline.spans if s.lane == lane]
        for kind in sorted({s.name.split(" ")[0] for s in spans}):
            bars = [((s.start_s - timeline.start_s) * 1e3, max((s.end_s - s.start_s) * 1e3, 1e-3))
                    for s in spans if s.name.split(" ")[0] == kind]
            axes.broken_barh(bars, (row - 0.38, 0.76), color=COLORS.get(kind, "tab:gray"), alpha=0.75, label=kind)
    axes.set_yticks(range(len(lanes)))
    axes.set_yticklabels([f"{lane} ({summary[lane]['busy_fraction']:.0%})" for lane in lanes])
    axes.invert_yaxis()
    axes.set_xlim(0, (timeline.end_s - timeline.start_s) * 1e3)
    axes.set_xlabel("ms since the step began (busy share of the step in brackets)")
    axes.set_title(timeline.title)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        axes.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_timeline_files(timeline: Timeline, directory: Path) -> dict:
    """trace.json, timeline.png and lanes.json (`lane_summary`) into `directory`; returns the summary."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_chrome_trace(timeline, directory / "trace.json")
    write_png(timeline, directory / "timeline.png")
    lanes = timeline.lane_summary()
    (directory / "lanes.json").write_text(json.dumps(lanes, indent=2) + "\n")
    return {"dir": str(directory), "title": timeline.title, "window_s": timeline.end_s - timeline.start_s, "lanes": lanes}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m fuyou.timeline TRACE.json OUT.png   (draws a fuyou profile's trace.json)")
    write_png(from_chrome_trace(json.loads(Path(sys.argv[1]).read_text())), Path(sys.argv[2]))
