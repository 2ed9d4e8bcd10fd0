"""benchmarks/diag/qlora_gaps.py's trace arithmetic: GPU busy time is the union of device intervals, and each idle
gap is charged to the innermost host range open when the work after it was launched. Its figures are quoted in
benchmarks/RESULTS.md, so the accounting is tested on a trace built by hand (microseconds, as the profiler writes)."""

import pytest

from benchmarks.diag.qlora_gaps import RANGES, analyse


def kernel(start, end, correlation, category="kernel"):
    return {"ph": "X", "cat": category, "name": f"k{correlation}", "ts": start, "dur": end - start,
            "args": {"correlation": correlation}}


def launch(ts, correlation):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "args": {"correlation": correlation}}


def host_range(start, end, name):
    return {"ph": "X", "cat": "user_annotation", "name": RANGES + name, "ts": start, "dur": end - start}


def test_gaps_are_charged_to_the_innermost_range_that_launched_late():
    trace = {"traceEvents": [
        host_range(0, 100, "block call"), host_range(40, 60, "wait for weights"), host_range(100, 200, "optimizer"),
        kernel(10, 30, 1), launch(5, 1),
        kernel(20, 50, 2), launch(8, 2),  # overlaps the first: busy is the union
        kernel(70, 80, 3), launch(45, 3),  # 20 idle before it, launched inside "wait for weights" (innermost)
        kernel(80, 90, 4, "gpu_memcpy"), launch(46, 4),  # back to back: no gap
        kernel(150, 160, 5), launch(140, 5),  # 60 idle, launched inside "optimizer"
        kernel(170, 175, 6),  # 10 idle, no launch record (e.g. a kernel launched through the driver API)
    ]}
    result = analyse(trace)
    assert result["gpu_span_s"] == pytest.approx(165e-6)
    assert result["gpu_busy_s"] == pytest.approx((50 - 10 + 10 + 10 + 10 + 5) * 1e-6)
    assert result["gpu_idle_s"] == pytest.approx((20 + 60 + 10) * 1e-6)
    assert result["idle_by_host_range_s"] == pytest.approx({"optimizer": 60e-6, "wait for weights": 20e-6, "no launch record": 10e-6})
    assert result["host_in_range_s"] == pytest.approx({"block call": 100e-6, "optimizer": 100e-6, "wait for weights": 20e-6})
