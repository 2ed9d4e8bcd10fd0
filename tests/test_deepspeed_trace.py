"""DeepSpeed's step as a timeline (benchmarks.deepspeed_trace) and Fuyou's case timelines, on the CPU."""

import json

import pytest
import torch

from benchmarks.deepspeed_trace import ANCHOR, MERGE_GAP_S, AioTrace, _TracedHandle, profiled, profiler_spans
from benchmarks.run import CASES, run_case


def test_profiler_spans_are_placed_on_the_host_clock_merged_and_laned():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": ANCHOR, "ts": 1_000_000.0, "dur": 1.0},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1_000_100.0, "dur": 50.0},
        {"ph": "X", "cat": "kernel", "name": "gelu", "ts": 1_000_160.0, "dur": 10.0},  # 10 µs gap: merged
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1_000_400.0, "dur": 20.0},  # 230 µs gap: a new span
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 1_000_200.0, "dur": 30.0,
         "args": {"bytes": 4096}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 1_000_300.0, "dur": 5.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1_000_050.0, "dur": 5.0},
    ]}
    spans = profiler_spans(trace, anchor_s=10.0)
    compute = sorted((s for s in spans if s.lane == "compute"), key=lambda s: s.start_s)
    assert [(round(s.start_s - 10.0, 7), round(s.end_s - 10.0, 7)) for s in compute] == [(100e-6, 170e-6), (400e-6, 420e-6)]
    assert 10e-6 < MERGE_GAP_S < 230e-6
    (h2d,) = [s for s in spans if s.lane == "H2D"]
    assert h2d.num_bytes == 4096 and h2d.start_s == pytest.approx(10.0 + 200e-6)
    assert [s.lane for s in spans if s.lane == "D2H"] == ["D2H"]
    with pytest.raises(ValueError, match="annotation"):
        profiler_spans({"traceEvents": trace["traceEvents"][1:]}, anchor_s=0.0)


class _Handle:
    """An aio handle's interface as DeepSpeed's swappers call it: submissions, then one wait for all."""

    def __init__(self):
        self.pending = 0

    def async_pread(self, buffer, path, offset):
        self.pending += 1
        return 0

    def async_pwrite(self, buffer, path, offset):
        self.pending += 1
        return 0

    def wait(self):
        done, self.pending = self.pending, 0
        return done

    def is_pinned(self, tensor):
        return False


def test_traced_aio_handle_spans_submissions_to_their_wait_and_passes_everything_through():
    trace = AioTrace()
    handle = _TracedHandle(_Handle(), trace)
    buffer = torch.zeros(1024, dtype=torch.float32)
    handle.async_pread(buffer, "/x", 0)
    assert handle.wait() == 1 and trace.spans == []  # not recording: nothing kept
    trace.recording = True
    assert handle.async_pwrite(buffer, "/x", 0) == 0 and handle.async_pwrite(buffer, "/y", 0) == 0
    assert handle.async_pread(buffer, "/z", 0) == 0
    assert handle.wait() == 3
    spans = {s.lane: s for s in trace.spans}
    assert set(spans) == {"SSD read", "SSD write"}
    assert spans["SSD write"].num_bytes == 2 * 4096 and spans["SSD read"].num_bytes == 4096
    assert spans["SSD write"].start_s <= spans["SSD read"].start_s <= spans["SSD read"].end_s
    assert handle.is_pinned(buffer) is False  # other methods reach the real handle


def test_profiled_finds_its_anchor_around_real_work():
    with profiled(None) as spans:
        torch.randn(64, 64) @ torch.randn(64, 64)
    assert all(span.lane in ("compute", "H2D", "D2H", "device copy") for span in spans)  # CPU: no kernels, no error


def test_a_fuyou_case_draws_its_last_step(tmp_path):
    case = next(case for case in CASES if case.name == "fuyou-tiny-cpu")
    result = run_case(case, (f"offload.ssd_dir={tmp_path}", "train.steps=3"), timeline_dir=tmp_path / "timeline")
    assert (tmp_path / "timeline" / "timeline.png").stat().st_size > 0
    lanes = json.loads((tmp_path / "timeline" / "lanes.json").read_text())
    assert lanes == result["timeline"]["lanes"]
    assert {"compute", "SSD read", "SSD write", "CPU optimizer"} <= set(lanes)
    assert lanes["compute"]["busy_s"] > 0 and lanes["SSD write"]["bytes"] > 0 and lanes["CPU optimizer"]["spans"] > 0
    assert "step 3" in result["timeline"]["title"]


def test_a_timeline_draws_every_lane_that_has_traffic(tmp_path):
    from fuyou.timeline import Span, Timeline, write_timeline_files

    spans = [Span("compute", "kernels", 0.1, 0.2), Span("device copy", "d2d", 0.3, 0.4, 64)]
    timeline = Timeline.of(spans, 0.0, 1.0, ("compute", "H2D"), "t")
    assert timeline.lanes == ("compute", "H2D", "device copy")
    assert write_timeline_files(timeline, tmp_path)["lanes"]["device copy"]["bytes"] == 64
