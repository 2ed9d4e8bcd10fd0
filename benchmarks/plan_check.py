"""Check 1 of issue 5: the cost model's predicted step time against measured runs of the Fuyou runtime.

On the GPU machine, in one session (the disk is shared and noisy: probe on the day):

    fuyou probe --ssd-dir /path/on/the/disk --output /tmp/hw.yaml
    python -m benchmarks.plan_check --hardware /tmp/hw.yaml --run        # runs CASES, then compares

or compare results already written by `python -m benchmarks.run` / an earlier `--run`:

    python -m benchmarks.plan_check --hardware /tmp/hw.yaml benchmarks/results/check-*.json

Each result's command is parsed back into a config, its placement becomes a fixed `Plan`, and
`fuyou.plan.cost_model.predict` prices it on the profile, with updates deferred when most of the
run's steps deferred them (they follow a clipped step). Printed: a Markdown table of predicted and
measured step seconds (measured = the median steady-state step: after the first, and after the
second when updates were deferred; or step tokens / mean tokens/s after the first step where a result
kept no steps) and peak memory, with the error; the goal
(issue 5) is within +-10%.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from benchmarks.run import RESULTS_DIR, Case, run_case
from fuyou.config import TrainConfig
from fuyou.plan import HardwareProfile, Plan, predict
from fuyou.plan.cost_model import GiB, gradient_ring_buffers
from fuyou.plan.report import resolve_model

_COMMON = ("model.preset=gpt3-2.7b", "runtime=fuyou", "device=cuda", "train.precision=bf16", "data.source=synthetic",
           "train.save_final=false", "train.steps=6", "train.seq_len=2048", "train.lr=1e-4",
           "offload.gpu_memory_gb=24", "offload.prefetch_depth=2", "offload.params=cpu", "offload.activations=cpu")

# RAM path and SSD path (optimizer state on the disk: 2.7B x 12 B = 32 GB fits its 64 GB), two batches each.
CASES = [
    Case(f"check-2.7b-{path}-b{batch}", f"Fuyou runtime, GPT-3 2.7B, optimizer on {path}, batch {batch} x 2048, 24 GiB cap",
         "configs/tiny.yaml", (*_COMMON, f"train.batch_size={batch}", f"offload.optimizer={optimizer}",
                               *(("offload.ssd_dir=/tmp/fuyou-check",) if optimizer == "ssd" else ())))
    for path, optimizer in (("ram", "cpu"), ("ssd", "ssd"))
    for batch in (4, 8)
]


def plan_of(config: TrainConfig, precision_default: str) -> Plan:
    """The Plan a config runs (the runtime's defaults where offload.* is unset: everything on the CPU; a
    split of the optimizer state, offload.optimizer_cpu_blocks, puts it on ssd as the trainer does)."""
    offload, train = config.offload, config.train
    precision = train.precision if train.precision != "auto" else precision_default
    split = offload.optimizer_cpu_blocks is not None
    return Plan(params=offload.params or "cpu", optimizer=offload.optimizer or ("ssd" if split else "cpu"),
                activations=offload.activations or "cpu", micro_batch_size=train.batch_size,
                grad_accum=train.grad_accum, seq_len=train.seq_len, prefetch_depth=offload.prefetch_depth,
                precision=precision, optimizer_cpu_blocks=offload.optimizer_cpu_blocks)


def compare(result: dict, hardware: HardwareProfile) -> dict:
    words = shlex.split(result["command"])
    assert words[:3] == ["fuyou", "train", "--config"], result["command"]
    config = TrainConfig.from_yaml(words[3], words[4:])
    _, model = resolve_model(config)
    plan = plan_of(config, "bf16" if hardware.compute_device == "cuda" else "fp32")
    # Updates deferred (the previous step clipped) or overlapped with backward: as the run went.
    modes = ((result.get("runtime_stats") or {}).get("update_modes")) or {}
    deferred = modes.get("deferred", 0) > sum(modes.values()) / 2
    # the gradient ring where the runtime used one (one micro-batch a step, no clipping)
    ring = gradient_ring_buffers(config.offload.gradient_ring, plan.grad_accum, config.train.max_grad_norm is not None)
    prediction = predict(model, plan, hardware, deferred_updates=deferred, gradient_ring=ring)
    metrics = result["metrics"]
    # The median steady-state step, where the run kept its steps: after the first (warm-up: pinned
    # registration, allocator growth) and, with deferred updates, after the second too: the runtime
    # drains step 1's updates before its measured window, so step 2 runs without the previous step's
    # updates beside its forward (e.g. 0.42 s against 4.7 s for steps 3..), which the cost model prices.
    # Else the mean throughput after the first step.
    all_steps = [row["step_s"] for row in result.get("steps", [])]
    steps = all_steps[2:] if deferred and len(all_steps) >= 3 else all_steps[1:]
    measured_s = statistics.median(steps) if steps else plan.step_tokens / metrics["tokens_per_s"]
    return {
        "case": result["case"] + ("" if "max_grad_norm=null" not in result["command"] else " (no clipping)"),
        "plan": plan.describe() + (", updates deferred" if deferred else ""),
        "predicted_s": prediction.iteration_s,
        "measured_s": measured_s,
        "error": prediction.iteration_s / measured_s - 1,
        # the resource busiest over the whole step
        "bottleneck": max(("compute", prediction.compute_busy_s), ("pcie", prediction.pcie_busy_s),
                          ("ssd", prediction.ssd_busy_s), ("cpu", prediction.optimizer_busy_s), key=lambda kv: kv[1])[0],
        "predicted_gpu_gib": prediction.gpu_peak_bytes / GiB,
        "measured_gpu_gib": metrics["peak_gpu_bytes"] / GiB,
        "predicted_cpu_gib": prediction.cpu_peak_bytes / GiB,
        "measured_cpu_gib": metrics["peak_cpu_bytes"] / GiB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", type=Path, required=True, help="profile measured on this machine today")
    parser.add_argument("--run", action="store_true", help="run CASES first (writes benchmarks/results/check-*.json)")
    parser.add_argument("--case", action="append", default=[], help="with --run: only these cases")
    parser.add_argument("results", nargs="*", type=Path, help="result JSON files to compare")
    args = parser.parse_args(argv)
    hardware = HardwareProfile.from_yaml(args.hardware)
    results = [json.loads(path.read_text()) for path in args.results]
    if args.run:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        for case in CASES:
            if args.case and case.name not in args.case:
                continue
            result = run_case(case)
            (RESULTS_DIR / f"{case.name}.json").write_text(json.dumps(result, indent=2) + "\n")
            results.append(result)
    if not results:
        print("nothing to compare: pass result files or --run", file=sys.stderr)
        return 2
    print(f"Profile: {args.hardware} ({hardware.source})\n")
    print("| case | plan | predicted s | measured s | error | bottleneck | GPU GiB pred / meas | CPU GiB pred / meas |")
    print("|---|---|---:|---:|---:|---|---|---|")
    for row in (compare(result, hardware) for result in results):
        print(f"| {row['case']} | {row['plan']} | {row['predicted_s']:.3f} | {row['measured_s']:.3f} | "
              f"{row['error']:+.1%} | {row['bottleneck']} | {row['predicted_gpu_gib']:.1f} / {row['measured_gpu_gib']:.1f} | "
              f"{row['predicted_cpu_gib']:.1f} / {row['measured_cpu_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
