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
  and top-level runtime, device, seed.

outputs (under --output, default runs/<config name>-<date>-<time>):
  config.yaml    the resolved config
  metrics.jsonl  one JSON object per optimizer step: step, loss, lr, grad_norm, tokens,
                 step_tokens, step_s, tokens_per_s, model_tflops, peak_gpu_bytes, peak_cpu_bytes
  final/         the trained model as a Hugging Face directory (config.json + safetensors)
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


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"fuyou: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    from fuyou.errors import FuyouError

    try:
        if args.command == "train":
            return run_train(args)
        raise AssertionError(f"unhandled command {args.command}")
    except FuyouError as error:
        print(f"fuyou: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fuyou: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
