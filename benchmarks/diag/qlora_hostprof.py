"""Host (Python) time of streamed QLoRA steps, by function: cProfile over two steps (issue 7 diagnosis).

    python -m benchmarks.diag.qlora_hostprof [--compile] [--stream-cache-gb 6.5] [--batch-size 2] ...

Builds the streamed model as `benchmarks.diag.qlora_gaps` does, runs 3 warm-up and 3 timed steps, then
profiles two steps with cProfile and prints the top functions by own time and by cumulative time. Where
the GPU waits for the host, this says which host code it waits for (kernel launches, the compiled
graphs' wrappers, bitsandbytes' Python ops, waits on copies). cProfile slows Python-heavy code, so read
shares, not absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

from benchmarks.diag.qlora_gaps import add_build_arguments, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(parser, stream_cache_gb=6.5)
    parser.add_argument("--top", type=int, default=35, help="functions listed per ordering")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from benchmarks.qlora import synthetic_batches

    trainer = build(args)
    batches = synthetic_batches(args)
    for _ in range(3):
        trainer.step([next(batches)])
    step_s = []
    for _ in range(3):
        torch.cuda.synchronize()
        start_s = time.perf_counter()
        trainer.step([next(batches)])
        step_s.append(time.perf_counter() - start_s)
    print("steps", [round(s, 3) for s in step_s])
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    start_s = time.perf_counter()
    profiler.enable()
    for _ in range(2):
        trainer.step([next(batches)])
    profiler.disable()
    print("profiled 2 steps", round(time.perf_counter() - start_s, 3))
    for order in ("tottime", "cumtime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.top)
        print(text.getvalue())
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
