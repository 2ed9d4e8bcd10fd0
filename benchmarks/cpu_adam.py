"""CPU AdamW kernels compared: torch's fused CPU AdamW against DeepSpeed's DeepSpeedCPUAdam.

    python -m benchmarks.cpu_adam --numel 268435456 --repeats 5

Both update the same fp32 master/gradient/moments in place through `offload.cpu_optimizer.AdamWKernel`
(the code path the Fuyou runtime uses); the figure is parameters updated per second, median of the
repeats after one warm-up. DeepSpeed is measured only where it imports (its first use JIT-builds the
kernel; that build time is reported apart). Results go to benchmarks/results/cpu-adam-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from offload.cpu_optimizer import AdamWKernel

RESULTS_DIR = Path(__file__).parent / "results"


def measure(kernel_name: str, numel: int, repeats: int) -> dict:
    build_start_s = time.perf_counter()
    kernel = AdamWKernel(kernel_name, betas=(0.9, 0.95), eps=1e-8)
    master, grad = torch.randn(numel), torch.randn(numel)
    exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)
    kernel.step(master, grad, exp_avg, exp_avg_sq, step=1, lr=1e-4, weight_decay=0.1)  # warm-up (and JIT build)
    setup_s = time.perf_counter() - build_start_s
    times_s = []
    for step in range(2, repeats + 2):
        start_s = time.perf_counter()
        kernel.step(master, grad, exp_avg, exp_avg_sq, step=step, lr=1e-4, weight_decay=0.1)
        times_s.append(time.perf_counter() - start_s)
    median_s = statistics.median(times_s)
    return {"kernel": kernel_name, "numel": numel, "median_s": median_s, "gparams_per_s": numel / median_s / 1e9, "setup_s": setup_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=256 << 20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [measure("torch", args.numel, args.repeats)]
    print(json.dumps(rows[-1]), flush=True)
    try:
        rows.append(measure("deepspeed", args.numel, args.repeats))
    except Exception as error:  # noqa: BLE001 - absent or unbuildable DeepSpeed is a result to record
        rows.append({"kernel": "deepspeed", "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"})
    print(json.dumps(rows[-1]), flush=True)
    result = {"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(), "rows": rows}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"cpu-adam-{result['date']}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
