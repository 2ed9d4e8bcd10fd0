"""`fuyou` command line: parse, build, call. No logic lives only here; see fuyou.trainer.

Exit codes: 0 success, 2 a mistake in the input (one line on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

TRAIN_EPILOG = """\
overrides:
  Any config field can be set as section.key=value after the options, e.g.
    fuyou train --config configs/tiny.yaml train.steps=50 train.lr=3e-4 model.preset=tiny-gpt3
  Sections: model (preset, path, shape fields), data (source, format, tokenizer, pack),
  train (steps, batch_size, seq_len, grad_accum, lr, warmup_steps, min_lr_ratio, weight_decay,
  beta1, beta2, eps, max_grad_norm, activation_checkpointing, precision, log_every, save_final),
  offload (params, optimizer, activations, gpu_memory_gb, cpu_memory_gb, ssd_dir, prefetch_depth),
  quant (mode: none | halo | qlora, halo_level, halo_scaling: current | delayed, halo_amax_history, lora_rank, lora_alpha, lora_dropout, lora_targets,
  optimizer_bits, save_merged, stream),
  and top-level runtime, device, seed, plan (manual | auto: the planner places states for
  runtime=fuyou) and hardware (a profile from fuyou probe for plan=auto; default: probe this machine).

outputs (under --output, default runs/<config name>-<date>-<time>):
  config.yaml    the resolved config
  metrics.jsonl  one JSON object per optimizer step: step, loss, lr, grad_norm, tokens,
                 step_tokens, step_s, tokens_per_s, model_tflops, peak_gpu_bytes, peak_cpu_bytes
  final/         the trained model as a Hugging Face directory (config.json + safetensors)
"""


PROFILE_EPILOG = """\
Runs --warmup steps, then --steps measured steps of the config's training job (as fuyou train would run
it), and reports: tokens/s, seconds per 10k tokens, model TFLOPS (6 N tokens / s), hardware TFLOPS
(with recomputed block forwards), utilisation against the hardware profile's gpu_tflops (--hardware or
hardware=), peak GPU memory (torch allocated and reserved, NVML), peak CPU RSS, pinned bytes, bytes
moved over PCIe and to/from SSD, and GPU energy (NVML or nvidia-smi; n/a without an NVIDIA GPU).

sweeps:
  --sweep key=v1,v2,... profiles every value (several --sweep: every combination), e.g.
    fuyou profile --config configs/tiny.yaml --sweep train.batch_size=4,8,16 --sweep runtime=reference,fuyou

outputs (under --output, default runs/profile-<config name>-<date>-<time>):
  profile.json   config, device, the measurement, each measured step, the timeline's lanes
  profile.csv    the measurement as one row (the same numbers)
  timeline.png   the last measured step: compute, H2D, D2H, SSD read, SSD write, CPU optimizer lanes
  trace.json     the same step as a Chrome trace: open it in https://ui.perfetto.dev
  with --sweep: point-NN/ (the files above per point), sweep.csv, sweep.json,
                sweep_tokens_per_s.png, sweep_vram.png
"""


def build_parser() -> argparse.ArgumentParser:
    from fuyou import __version__

    parser = argparse.ArgumentParser(
        prog="fuyou",
        description="Full fine-tuning of large language models on one GPU, with CPU and SSD offload.",
    )
    parser.add_argument("--version", action="version", version=f"fuyou {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="fine-tune a model",
        description="Fine-tune a model as a YAML config (plus key=value overrides) says.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", type=Path, help="YAML config (default: built-in defaults, a tiny model on synthetic data)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
    train.add_argument("--output", type=Path, help="output directory (default: runs/<config name>-<date>-<time>)")
    train.add_argument("--overwrite", action="store_true", help="replace the run files in a non-empty --output")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")

    plan = commands.add_parser(
        "plan",
        help="predict a run: placement, swapping, batch, iteration time, TFLOPS, memory",
        description="Choose where parameters, optimizer state and activations live for a config's job on a "
        "hardware profile, and predict its step (fuyou.plan). Nothing is allocated.",
    )
    plan.add_argument("--config", type=Path, help="YAML run config (default: built-in defaults)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=16")
    plan.add_argument("--hardware", type=Path, help="hardware profile YAML (default: a quick probe of this machine)")
    plan.add_argument("--json", action="store_true", help="print one JSON object (iteration_s, tflops, feasible, ...)")
    plan.add_argument("--search-batch", action="store_true", help="also choose the step's batch (powers of two up to the config's)")
    plan.add_argument("--swap-internals", action="store_true",
                      help="Fuyou's finer activation swapping (block internals); the runtime does not do it yet")

    profile = commands.add_parser(
        "profile",
        help="measure a config's steps: throughput, TFLOPS, memory, I/O, energy, a timeline",
        description="Profile a config's training steps (fuyou.profile); with --sweep, a table over config values.",
        epilog=PROFILE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    profile.add_argument("--config", type=Path, help="YAML run config (default: built-in defaults)")
    profile.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. runtime=fuyou")
    profile.add_argument("--warmup", type=int, default=2, help="steps run before measuring (default 2)")
    profile.add_argument("--steps", type=int, default=5, help="measured steps (default 5)")
    profile.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2,...",
                         help="profile each value of a config key (repeatable: every combination)")
    profile.add_argument("--hardware", type=Path, help="hardware profile YAML for utilisation (same as hardware=PATH)")
    profile.add_argument("--output", type=Path, help="output directory (default: runs/profile-<config name>-<date>-<time>)")
    profile.add_argument("--overwrite", action="store_true", help="replace the profile files in a non-empty --output")
    profile.add_argument("--quiet", action="store_true", help="no per-step lines on stderr")

    probe = commands.add_parser(
        "probe",
        help="measure this machine into a hardware profile",
        description="Measure GEMM rates, host<->device copies, CPU AdamW, SSD read/write and capacities (fuyou.plan.probe).",
    )
    probe.add_argument("--ssd-dir", help="directory on the SSD(s) to test (default: the system temp directory)")
    probe.add_argument("--output", type=Path, help="write the profile here (YAML); default: print it")
    probe.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (CI); rates far below the hardware's")
    return parser


def run_train(args: argparse.Namespace) -> int:
    from fuyou.config import TrainConfig
    from fuyou.trainer import Trainer

    config = TrainConfig.from_yaml(args.config, args.overrides)
    output = args.output
    if output is None:
        name = args.config.stem if args.config is not None else "default"
        output = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = Trainer(config, output_dir=output, overwrite=args.overwrite, progress=not args.no_progress)
    summary = trainer.train()
    print(summary.format())
    return 0


def run_plan(args: argparse.Namespace) -> int:
    import json

    from fuyou.config import TrainConfig
    from fuyou.plan import HardwareProfile
    from fuyou.plan.probe import probe
    from fuyou.plan.report import plan_config, to_json, to_text

    config = TrainConfig.from_yaml(args.config, args.overrides)
    if args.hardware is not None:
        hardware = HardwareProfile.from_yaml(args.hardware)
    else:
        print("fuyou: no --hardware given: probing this machine (fuyou probe --quick)", file=sys.stderr)
        hardware = probe(config.offload.ssd_dir, quick=True, log=lambda line: None)
    report = plan_config(config, hardware, search_batch=args.search_batch, swap_internals=args.swap_internals)
    print(json.dumps(to_json(report)) if args.json else to_text(report))
    return 0 if report.feasible else 2


def run_profile(args: argparse.Namespace) -> int:
    from fuyou.config import TrainConfig
    from fuyou.profile import run_profile as profile

    overrides = list(args.overrides) + ([f"hardware={args.hardware}"] if args.hardware is not None else [])
    config = TrainConfig.from_yaml(args.config, overrides)
    output = args.output
    if output is None:
        name = args.config.stem if args.config is not None else "default"
        output = Path("runs") / f"profile-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(profile(config, warmup=args.warmup, steps=args.steps, sweeps=args.sweep, output=output,
                  overwrite=args.overwrite, quiet=args.quiet))
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from fuyou.plan.probe import probe, write_profile

    profile = probe(args.ssd_dir, quick=args.quick, log=lambda line: print(line, file=sys.stderr))
    if args.output is not None:
        write_profile(profile, args.output)
        print(f"wrote {args.output}")
    else:
        import yaml

        print(yaml.safe_dump(profile.to_dict(), sort_keys=False, width=120), end="")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"fuyou: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    from fuyou.errors import FuyouError

    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "plan":
            return run_plan(args)
        if args.command == "probe":
            return run_probe(args)
        if args.command == "profile":
            return run_profile(args)
        raise AssertionError(f"unhandled command {args.command}")
    except FuyouError as error:
        print(f"fuyou: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fuyou: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
