"""Where a streamed QLoRA step leaves the GPU idle, and what the host is doing then (issue 7 diagnosis).

    python -m benchmarks.diag.qlora_gaps [--preset llama3-8b] [--batch-size 2] [--stream-cache-gb 7] [--compile]
                                          [--gpu-memory-gb 24] [--prefetch-depth 2] [--warmup-steps 3] [--trace PATH]

Builds the streamed model as `benchmarks.qlora --variants ours-stream` does, runs warm-up steps, then profiles
one step with named host ranges around the schedule's parts (block forward/recompute call, its backward,
waiting for a block's weights, releasing them, head and loss, optimizer). From the profiler's trace it takes
the GPU's busy intervals (all kernels and copies on any stream), the idle gaps between them, and charges each
gap to the innermost host range open when the work after the gap was launched: the host part that was late.
Prints the step's wall time, GPU busy time, gap time by host range, and host time inside each range.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gzip
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

RANGES = "fuyou."  # prefix of this script's host range names


def _ranged(name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(RANGES + name):
            return function(*args, **kwargs)

    return wrapper


def build(args):
    from benchmarks.qlora import LORA, init_on_gpu, model_config
    from fuyou.models import build_model
    from offload import GiB, TieredStore
    from quant.qlora import make_paged_adamw
    from quant.qlora_stream import StreamedQLoRA, build_streamed_qlora

    def materialize(piece):
        piece.to_empty(device=device)
        init_on_gpu(piece)

    device = torch.device("cuda", torch.cuda.current_device())
    store = TieredStore(gpu_cap_bytes=int(args.gpu_memory_gb * GiB), device=device)
    model, payloads = build_streamed_qlora(build_model(model_config(args), device="meta"), store=store, device=device,
                                           materialize=materialize, rank=LORA["rank"], alpha=LORA["alpha"],
                                           dropout=LORA["dropout"])
    optimizer = make_paged_adamw(model, lr=2e-4, weight_decay=0.1, optim_bits=8)
    return StreamedQLoRA(model, payloads, store, device=device, optimizer=optimizer, lr=2e-4, warmup_steps=0,
                         total_steps=100, max_grad_norm=1.0, precision="bf16", prefetch_depth=args.prefetch_depth,
                         cache_bytes=int(args.stream_cache_gb * GiB), compile_blocks=args.compile)


def add_build_arguments(parser: argparse.ArgumentParser, *, stream_cache_gb: float) -> None:
    """The flags `build` reads (model, batch, cache, cap, depth, compile)."""
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--stream-cache-gb", type=float, default=stream_cache_gb)
    parser.add_argument("--gpu-memory-gb", type=float, default=24.0)
    parser.add_argument("--prefetch-depth", type=int, default=2)
    parser.add_argument("--compile", action="store_true")


def instrument(trainer) -> None:
    """Named host ranges around the schedule's parts (on this trainer and the module functions it calls)."""
    import quant.qlora_stream as stream
    from fuyou.schedule import WeightStream

    trainer._block = _ranged("block call", trainer._block)
    trainer._release = _ranged("release weights", trainer._release)
    trainer._rng_state = _ranged("rng state", trainer._rng_state)
    stream.head_loss_backward = _ranged("head and loss", stream.head_loss_backward)
    stream.optimizer_step = _ranged("optimizer", stream.optimizer_step)
    WeightStream.next = _ranged("wait for weights", WeightStream.next)
    torch.Tensor.backward = _ranged("block backward", torch.Tensor.backward)


def analyse(trace: dict) -> dict:
    events = trace["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ranges = sorted((e["ts"], e["ts"] + e["dur"], e["name"][len(RANGES):]) for e in events
                    if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e["name"].startswith(RANGES))
    starts = [r[0] for r in ranges]

    def innermost(ts: float) -> str:
        best = "outside any range"
        for start, end, name in ranges[: bisect.bisect_right(starts, ts)][-64:]:
            if start <= ts <= end:
                best = name  # later starts are nested deeper
        return best

    busy_us, gaps_us, gap_by_range = 0.0, 0.0, defaultdict(float)
    busy_end = gpu[0][1]
    busy_us = gpu[0][1] - gpu[0][0]
    for start, end, event in gpu[1:]:
        if start > busy_end:
            gap = start - busy_end
            gaps_us += gap
            launch = launches.get(event.get("args", {}).get("correlation"))
            gap_by_range[innermost(launch) if launch is not None else "no launch record"] += gap
            busy_us += end - start
            busy_end = end
        elif end > busy_end:
            busy_us += end - busy_end
            busy_end = end
    host_by_range = defaultdict(float)
    for start, end, name in ranges:
        host_by_range[name] += end - start
    return {
        "gpu_span_s": (busy_end - gpu[0][0]) / 1e6,
        "gpu_busy_s": busy_us / 1e6,
        "gpu_idle_s": gaps_us / 1e6,
        "idle_by_host_range_s": {k: v / 1e6 for k, v in sorted(gap_by_range.items(), key=lambda kv: -kv[1])},
        "host_in_range_s": {k: v / 1e6 for k, v in sorted(host_by_range.items(), key=lambda kv: -kv[1])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(parser, stream_cache_gb=7.0)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--trace", type=Path, default=None, help="also write the profiler's trace here (gzip JSON)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from benchmarks.qlora import synthetic_batches
    from torch.profiler import ProfilerActivity, profile

    trainer = build(args)
    batches = synthetic_batches(args)
    for _ in range(args.warmup_steps):
        trainer.step([next(batches)])
    instrument(trainer)
    unprofiled = []
    for _ in range(3):
        start_s = time.perf_counter()
        trainer.step([next(batches)])
        unprofiled.append(time.perf_counter() - start_s)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        start_s = time.perf_counter()
        trainer.step([next(batches)])
        profiled_s = time.perf_counter() - start_s
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "trace.json"
        profiler.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        if args.trace is not None:
            with gzip.open(args.trace, "wt") as out:
                json.dump(trace, out)
    result = {"step_s_unprofiled_with_ranges": unprofiled, "step_s_profiled": profiled_s, **analyse(trace)}
    trainer.close()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
