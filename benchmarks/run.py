"""Named benchmark cases, run in one process, written as JSON and printed as a Markdown table.

    python -m benchmarks.run --case ref-1.3b-bs4 --case ref-1.3b-ckpt-bs8
    python -m benchmarks.run --case ssd-1.3b --case ram-2.7b [--system fuyou --system zero-infinity]
    python -m benchmarks.run --list

Each case is a config plus overrides, trained through the same `fuyou.Trainer` users run, so a
figure here is what `fuyou train` with the printed command gives. Steps are few: throughput is the
mean over the steps after the first (see fuyou.metrics.TrainSummary). Results go to
benchmarks/results/<case>.json with date, device, commit and the equivalent command.

The comparisons with DeepSpeed (issue 6: `ssd-1.3b`, `ram-2.7b`, `ssd-2.7b`) are named here too but
live in benchmarks/compare.py: each system runs in its own subprocess, Fuyou's side as
`python -m benchmarks.run --case <its case> --set offload.ssd_dir=... --json-out ...`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    config: str
    overrides: tuple[str, ...]

    def command(self) -> str:
        return shlex.join(["fuyou", "train", "--config", self.config, *self.overrides])


def _fuyou_2_7b(optimizer: str, batch_size: int, grad_accum: int) -> Case:
    """The Fuyou runtime on the GPT-3 2.7B shape under the 24 GiB cap; optimizer state in RAM or on SSD."""
    path = "ram" if optimizer == "cpu" else "ssd"
    where = "every state in CPU RAM" if optimizer == "cpu" else "optimizer state (fp32 masters, moments) on SSD, params and activations in RAM"
    return Case(
        f"fuyou-2.7b-{path}-b{batch_size}-ga{grad_accum}",
        f"Fuyou runtime, GPT-3 2.7B shape, bf16, {where}, GPU capped at 24 GiB, batch {batch_size} x 2048, grad_accum {grad_accum}",
        "configs/tiny.yaml",
        (
            "model.preset=gpt3-2.7b",
            "runtime=fuyou",
            "device=cuda",
            "train.precision=bf16",
            "data.source=synthetic",
            "train.save_final=false",
            f"train.steps={5 if optimizer == 'cpu' else 3}",
            f"train.batch_size={batch_size}",
            "train.seq_len=2048",
            f"train.grad_accum={grad_accum}",
            "train.lr=1e-4",
            "offload.params=cpu",
            f"offload.optimizer={optimizer}",
            "offload.activations=cpu",
            "offload.gpu_memory_gb=24",
            "offload.prefetch_depth=2",
        ),
    )


_GPU_REFERENCE = ("runtime=reference", "device=cuda", "train.precision=bf16", "data.source=synthetic", "train.save_final=false")

CASES = [
    Case(
        "ref-1.3b-bs4",
        "reference trainer, GPT-3 1.3B shape, bf16 autocast, batch 4 x 2048, no activation checkpointing",
        "configs/tiny.yaml",
        ("model.preset=gpt3-1.3b", *_GPU_REFERENCE, "train.steps=20", "train.batch_size=4", "train.seq_len=2048", "train.lr=1e-4"),
    ),
    Case(
        "ref-1.3b-ckpt-bs8",
        "reference trainer, GPT-3 1.3B shape, bf16 autocast, batch 8 x 2048, activation checkpointing",
        "configs/tiny.yaml",
        (
            "model.preset=gpt3-1.3b",
            *_GPU_REFERENCE,
            "train.steps=20",
            "train.batch_size=8",
            "train.seq_len=2048",
            "train.lr=1e-4",
            "train.activation_checkpointing=true",
        ),
    ),
    *(
        _fuyou_2_7b(optimizer, batch_size, grad_accum)
        for optimizer, batch_size, grad_accum in (
            ("cpu", 8, 2), ("cpu", 8, 4), ("cpu", 4, 8), ("cpu", 8, 1), ("cpu", 16, 1), ("cpu", 32, 1), ("cpu", 64, 1),
            ("ssd", 8, 1), ("ssd", 32, 1),
        )
    ),
    Case(
        # Issue 4's RAM-path figure on a larger GPT-3 shape: d = 4096 blocks run at 0.86 of the GEMM rate against
        # 0.76 for 2.7B's (benchmarks.compile_block). Every state in RAM: fp32 masters and moments (80 GB), no
        # bf16 copy (params streamed from the masters), block inputs (fp32, 17 GB at 40 x 1024), gradients
        # through two block-sized buffers, which needs one micro-batch and no clipping; the embeddings'
        # AdamW on the GPU (their moments, 1.7 GB, beside their resident weights).
        "fuyou-6.7b-ram-master",
        "Fuyou runtime, GPT-3 6.7B shape, bf16, every state in CPU RAM but the embeddings' moments, weights "
        "streamed from the fp32 masters, gradient ring of 2, no clipping, train.compile, GPU capped at 24 GiB, batch 40 x 1024",
        "configs/tiny.yaml",
        (
            "model.preset=gpt3-6.7b",
            "runtime=fuyou",
            "device=cuda",
            "train.precision=bf16",
            "train.compile=true",
            "data.source=synthetic",
            "train.save_final=false",
            "train.steps=5",
            "train.batch_size=40",
            "train.seq_len=1024",
            "train.grad_accum=1",
            "train.lr=1e-4",
            "train.max_grad_norm=null",
            "offload.params=master",
            "offload.optimizer=cpu",
            "offload.activations=cpu",
            "offload.gradient_ring=2",
            "offload.outer_optimizer=gpu",
            "offload.gpu_memory_gb=24",
            "offload.prefetch_depth=2",
        ),
    ),
    Case(
        "fuyou-1.3b-ssd-b8-ga1",
        "Fuyou runtime, GPT-3 1.3B shape, bf16, optimizer state (fp32 masters, moments) on SSD, params and "
        "activations in RAM, GPU capped at 24 GiB, batch 8 x 2048, 3 steps (Fuyou's side of the ssd-1.3b comparison)",
        "configs/tiny.yaml",
        tuple(override.replace("gpt3-2.7b", "gpt3-1.3b") for override in _fuyou_2_7b("ssd", 8, 1).overrides),
    ),
    Case(
        # Issue 4's largest model on the GPU machine (125 GB RAM, 64 GB disk): 10.3B parameters need 124 GB
        # of fp32 masters and moments, so blocks 0-19 keep theirs in RAM and blocks 20-31 on the disk
        # (45 GB); gradients through two block-sized buffers (no clipping, one micro-batch); block inputs
        # recomputed from x_0 (the step is disk-bound, so most of the recompute hides under it, and it
        # costs no RAM). 20 RAM blocks: three fewer than the check's most on that machine (RESULTS.md).
        "fuyou-10b-split",
        "Fuyou runtime, GPT-3 13B shape with 32 layers (10.3B parameters), bf16, optimizer state of blocks 0-19 "
        "in RAM and 20-31 on SSD, params in RAM, activations recomputed, gradient ring of 2, no clipping, "
        "GPU capped at 24 GiB, batch 16 x 2048",
        "configs/tiny.yaml",
        (
            "model.preset=gpt3-13b",
            "model.num_layers=32",
            "runtime=fuyou",
            "device=cuda",
            "train.precision=bf16",
            "data.source=synthetic",
            "train.save_final=false",
            "train.steps=4",
            "train.batch_size=16",
            "train.seq_len=2048",
            "train.grad_accum=1",
            "train.lr=1e-4",
            "train.max_grad_norm=null",
            "offload.params=cpu",
            "offload.optimizer=ssd",
            "offload.optimizer_cpu_blocks=20",
            "offload.activations=none",
            "offload.gradient_ring=2",
            "offload.gpu_memory_gb=24",
            "offload.prefetch_depth=2",
            "offload.ssd_dir=/root/swap",
        ),
    ),
    Case(
        "fuyou-1.3b-split-b8-ga1",
        "Fuyou runtime, GPT-3 1.3B shape, bf16, the optimizer state of blocks 0-15 (and embeddings/head) in RAM "
        "and of blocks 16-23 on SSD, pinned pool capped at the 24 GiB the ssd-1.3b comparison models (memory_need: "
        "22.9 GiB at 16 blocks, 24.0 at 18), batch 8 x 2048, 3 steps (Fuyou's side of ssd-1.3b)",
        "configs/tiny.yaml",
        (*(override.replace("gpt3-2.7b", "gpt3-1.3b") for override in _fuyou_2_7b("ssd", 8, 1).overrides),
         "offload.optimizer_cpu_blocks=16", "offload.cpu_memory_gb=24"),
    ),
    Case(
        "fuyou-1.3b-split-b16-ga1",
        "Fuyou runtime, GPT-3 1.3B shape, bf16, the optimizer state of blocks 0-10 (and embeddings/head) in RAM "
        "and of blocks 11-23 on SSD, pinned pool capped at 24 GiB (memory_need: 23.1 GiB at 11 blocks; twice "
        "b8's block inputs take 5 blocks' state out of RAM), batch 16 x 2048, 3 steps (issue 5's SSD path at a "
        "second batch size)",
        "configs/tiny.yaml",
        (*(override.replace("gpt3-2.7b", "gpt3-1.3b") for override in _fuyou_2_7b("ssd", 16, 1).overrides),
         "offload.optimizer_cpu_blocks=11", "offload.cpu_memory_gb=24"),
    ),
    Case(
        "fuyou-tiny-cpu",
        "Fuyou runtime, tiny LLaMA on the CPU with the optimizer state on SSD (a smoke test of this harness)",
        "configs/tiny.yaml",
        ("runtime=fuyou", "offload.optimizer=ssd", "train.steps=5", "train.save_final=false"),
    ),
    Case(
        "ref-tiny-cpu",
        "reference trainer, tiny LLaMA on the CPU (a smoke test of this harness)",
        "configs/tiny.yaml",
        ("train.steps=5", "train.save_final=false"),
    ),
]


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU (torch {torch.__version__})"


def _commit() -> str:
    """The commit measured. The device machine gets a copy of the tree without .git: pass FUYOU_COMMIT."""
    if os.environ.get("FUYOU_COMMIT"):
        return os.environ["FUYOU_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_case(case: Case, extra_overrides: tuple[str, ...] = (), timeline_dir: Path | None = None) -> dict:
    """Trains `case` in this process; `extra_overrides` (e.g. offload.ssd_dir=...) go after the case's own.

    `timeline_dir`: with runtime=fuyou, also trace the last step (until the work it queued is done) and
    write it there as timeline.png and trace.json (fuyou.timeline); the traced step stays in the figures.
    """
    from benchmarks.deepspeed_baseline import io_delta, proc_io
    from fuyou.config import TrainConfig
    from fuyou.runtime import FuyouRuntime
    from fuyou.timeline import RuntimeTrace
    from fuyou.trainer import Trainer

    overrides = (*case.overrides, *extra_overrides)
    with tempfile.TemporaryDirectory(prefix=f"bench-{case.name}-") as output_dir:
        init_start_s = time.perf_counter()
        trainer = Trainer(TrainConfig.from_yaml(case.config, overrides), output_dir=output_dir, overwrite=True, progress=False)
        # Building the model and placing its states (random init, pinned memory, the swap file's first
        # writes): minutes for a model near the machine's limits, and not part of any step.
        init_s = time.perf_counter() - init_start_s
        print(f"{case.name}: trainer built in {init_s:.1f} s", flush=True)
        # This process's disk traffic per step (/proc/self/io around the runtime's step), the counters
        # benchmarks.deepspeed_baseline reads for DeepSpeed: the same measure on both sides of a comparison.
        step_io: list[dict] = []
        runtime_step = trainer.runtime.step
        traced = timeline_dir is not None and isinstance(trainer.runtime, FuyouRuntime)
        trace = RuntimeTrace(trainer.runtime) if traced else None
        window_s = [0.0, 0.0]  # the traced step: from its start until the work it queued is done

        def measured_step(micro_batches):
            last = trace is not None and len(step_io) == trainer.config.train.steps - 1
            if last:
                # No drain first: the window shows the previous step's deferred updates overlapping this one.
                trace.start()
                window_s[0] = time.perf_counter()
            io_before = proc_io()
            result = runtime_step(micro_batches)
            if last:
                trainer.drain()  # nothing follows the last step, so this moves no work out of the measured window
                window_s[1] = time.perf_counter()
            step_io.append(io_delta(io_before, proc_io()))
            print(f"{case.name}: step {len(step_io)} loss {result.loss:.4f}", flush=True)  # progress, for long cases
            return result

        trainer.runtime.step = measured_step
        summary = trainer.train()
        timeline = None
        if trace is not None:
            timeline = _write_timeline(trace, *window_s, f"{case.name}, step {len(step_io)} (traced, timed)", timeline_dir)
        # Per-step rows (loss, grad norm, step time) from the run's own metrics.jsonl.
        keep = ("step", "loss", "grad_norm", "lr", "step_s", "tokens_per_s")
        lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
        steps = [{key: row[key] for key in keep if key in row} for row in map(json.loads, lines)]
        for row, io in zip(steps, step_io):
            row["io"] = io
    return {
        "case": case.name,
        "description": case.description,
        "device": _device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "command": shlex.join(["fuyou", "train", "--config", case.config, *overrides]),
        "parameters": trainer.num_parameters,
        "init_s": init_s,
        "metrics": asdict(summary),
        "steps": steps,
        # The Fuyou runtime's breakdown (CPU optimizer worker seconds, update modes, tier peaks).
        "runtime_stats": trainer.runtime.stats() if hasattr(trainer.runtime, "stats") else None,
        "peak_gpu_reserved_bytes": _peak_gpu_reserved_bytes(trainer.device),
        "timeline": timeline,
    }


def _write_timeline(trace, start_s: float, end_s: float, title: str, directory: Path) -> dict:
    from fuyou.timeline import Timeline, write_timeline_files

    spans = trace.stop()
    return write_timeline_files(Timeline.of(spans, start_s, end_s, trace.lanes(spans), f"Fuyou: {title}"), directory)


def _peak_gpu_reserved_bytes(device) -> int | None:
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_reserved(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", default=[], help="case name (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the cases")
    parser.add_argument("--system", action="append", default=[],
                        help="comparisons: run only these systems (fuyou, zero-infinity, zero-offload, pytorch; repeatable)")
    parser.add_argument("--ssd-dir", default=os.environ.get("FUYOU_BENCH_SSD_DIR", "/root/fuyou-bench"),
                        help="comparisons: every system's swap files go under this directory (on the disk to measure)")
    parser.add_argument("--baseline-arg", action="append", default=[], metavar="ARG",
                        help="comparisons: extra argument for every DeepSpeed baseline (e.g. --baseline-arg=--no-pipeline)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="cases: overrides after the case's own (e.g. offload.ssd_dir=/mnt/nvme/fuyou)")
    parser.add_argument("--json-out", default=None, help="cases: write the result here, not benchmarks/results/<case>.json")
    parser.add_argument("--timeline", default=None, metavar="DIR",
                        help="cases: trace the last step into DIR (timeline.png, trace.json); comparisons: every "
                             "system's last step, in its log archive")
    args = parser.parse_args(argv)
    from benchmarks.compare import COMPARISONS, comparison_table, run_comparison

    by_name = {case.name: case for case in CASES}
    comparisons = {comparison.name: comparison for comparison in COMPARISONS}
    if args.list or not args.case:
        for case in CASES:
            print(f"{case.name:22s} {case.description}")
        for comparison in COMPARISONS:
            print(f"{comparison.name:22s} [{', '.join(comparison.systems())}] {comparison.description}")
        return 0
    unknown = [name for name in args.case if name not in by_name and name not in comparisons]
    if unknown:
        print(f"unknown case(s) {', '.join(unknown)}; known: {', '.join([*by_name, *comparisons])}", file=sys.stderr)
        return 2
    if args.json_out and len(args.case) != 1:
        print("--json-out takes exactly one --case", file=sys.stderr)
        return 2
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rows, comparison_rows = [], []
    for name in args.case:
        if name in comparisons:
            result = run_comparison(comparisons[name], args.system, Path(args.ssd_dir), args.baseline_arg,
                                    timelines=args.timeline is not None)
            for directory in (RESULTS_DIR, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])):
                (directory / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            comparison_rows.append(result)
            print(f"done {name}: Fuyou / system, model TFLOPS: {json.dumps(result['ratio'])}", flush=True)
            continue
        start_s = time.perf_counter()
        try:
            result = run_case(by_name[name], tuple(args.set), Path(args.timeline) if args.timeline else None)
        except Exception as error:  # noqa: BLE001 - one failed case (e.g. out of memory) must not lose the others
            print(f"FAILED {name}: {type(error).__name__}: {error}", flush=True)
            continue
        result["wall_s"] = time.perf_counter() - start_s
        (Path(args.json_out) if args.json_out else RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        rows.append(result)
        print(f"done {name}: {json.dumps(result['metrics'])}", flush=True)
    if comparison_rows:
        print("\n" + comparison_table(comparison_rows))
    if not rows:
        return 0
    print("\n| case | params | tokens/s | s/10k tok | model TFLOPS | peak GPU GiB | peak CPU GiB | loss first→last |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        m = row["metrics"]
        print(
            f"| {row['case']} | {row['parameters'] / 1e9:.2f}B | {m['tokens_per_s']:,.0f} | {m['s_per_10k_tokens']:.3f} | "
            f"{m['model_tflops']:.1f} | {m['peak_gpu_bytes'] / 2**30:.1f} | {m['peak_cpu_bytes'] / 2**30:.1f} | "
            f"{m['first_loss']:.3f}→{m['final_loss']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
