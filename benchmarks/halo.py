"""HALO FP8 against bf16 on the GPU: each linear GEMM alone, then fine-tuning end to end (issue 7).

    python -m benchmarks.halo [--preset gpt3-1.3b] [--batch-size 4] [--seq-len 2048] [--steps 200]
                              [--e2e-levels 0 1] [--skip-gemm] [--skip-e2e] [--json PATH]

Part 1, per GEMM. For each block linear of the preset (x_TI [T, I], W_OI [O, I], T = batch x seq) it
times, with CUDA events around 8 back-to-back calls after a warm-up (median of `--repeats`; the
results recorded at e0dbf8b timed one call at a time, see TIMING):
    bf16       y = x W^T, dX = dY W, dW = dY^T X as plain bf16 matmuls (what autocast runs);
    fp8 GEMM   torch._scaled_mm alone on operands already quantized and laid out: the floor HALO can reach;
    halo Lk    quant.halo.halo_matmul at level k, everything included (rotations, amax, scale, cast, the
               transposed FP8 copies, padding): forward with both inputs requiring grad; input-grad with
               only x requiring grad; weight-grad with only W; and both gradients in one backward (dY is
               quantized once for both), with the compiled quantizer and with eager torch ops.
Inputs are bf16 random normal (never zeros), as autocast hands them over.

Part 2, end to end. The `fuyou.Trainer` (reference runtime, bf16 autocast, fp32 master weights, torch
AdamW on the GPU) on the preset for `--steps` steps of the built-in synthetic task, once in bf16 and once
per HALO level, same seed and data. Reported: final loss (mean of the last 10 steps) and its relative
difference to bf16, tokens/s over steps 11..end (the first steps include torch.compile), and speedup.

The JSON (--json) is rewritten after every measurement, so a run cut short keeps what it measured. The
commit comes from FUYOU_COMMIT (the device machine's copy of the tree has no .git).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.run import _commit, _device_name

SKIP_STEPS = 10  # steps left out of tokens/s: torch.compile and allocator warm-up happen in the first ones
LAST_STEPS = 10  # final loss = mean of the last LAST_STEPS steps


def linear_shapes(preset: str) -> list[tuple[str, int, int]]:
    """(name, I, O) of each linear layer in one block of `preset` (shapes only, nothing allocated)."""
    from fuyou.models import build_model, get_preset

    model = build_model(get_preset(preset).replace(num_layers=1), device="meta")
    return [(name.rsplit(".", 1)[-1], m.in_features, m.out_features)
            for name, m in model.blocks[0].named_modules() if isinstance(m, nn.Linear)]


# Calls timed back to back per sample. HALO's autograd.Function and compiled-quantizer guards cost host
# time per call; timed one call at a time (batch 1, how the first results were taken) the GPU can sit
# idle waiting for launches, which training, where the host runs ahead, does not see.
TIMING = {"batch": 8}


def time_ms(run, *, setup=None, repeats: int = 20, warmup: int = 3, batch: int | None = None) -> float:
    """Median milliseconds per call of `run(state)` between two CUDA events around `batch` back-to-back
    calls; each call's `state` comes from `setup()`, run untimed before the events."""
    batch = batch or TIMING["batch"]
    times = []
    for index in range(warmup + repeats):
        states = [setup() if setup is not None else None for _ in range(batch)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for state in states:
            run(state)
        end.record()
        del states
        if index >= warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in times) / batch


def gemm_rows(tokens: int, shapes, levels, repeats: int, quantizers) -> list[dict]:
    rows = []
    for name, in_features, out_features in shapes:
        rows.append(gemm_row(tokens, name, in_features, out_features, levels, repeats, quantizers))
        print(f"gemm {name}: {json.dumps(rows[-1])}", flush=True)
    return rows


def gemm_row(tokens: int, name: str, in_features: int, out_features: int, levels, repeats: int, quantizers) -> dict:
    from quant import halo

    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * in_features**-0.5
    dy = torch.randn(tokens, out_features, device="cuda", dtype=torch.bfloat16)
    flops = 2 * tokens * in_features * out_features
    row = {"linear": name, "T": tokens, "I": in_features, "O": out_features, "gflop_per_gemm": flops / 1e9}
    row["bf16"] = {
        "forward": time_ms(lambda _: x @ w.t(), repeats=repeats),
        "input_grad": time_ms(lambda _: dy @ w, repeats=repeats),
        "weight_grad": time_ms(lambda _: dy.t() @ x, repeats=repeats),
    }
    x_q, x_t, sx = halo._quantize_math(x, True, True)
    w_q, w_t, sw = halo._quantize_math(w, True, True)
    dy_q, dy_t, sdy = halo._quantize_math(dy, True, True)

    def raw(a, b_nk, sa, sb, fast):
        return torch._scaled_mm(a, b_nk.t(), sa, sb, out_dtype=torch.bfloat16, use_fast_accum=fast)

    row["fp8_gemm"] = {
        "forward": time_ms(lambda _: raw(x_q, w_q, sx, sw, True), repeats=repeats),
        "input_grad": time_ms(lambda _: raw(dy_q, w_t, sdy, sw, False), repeats=repeats),
        "weight_grad": time_ms(lambda _: raw(dy_t, x_t, sdy, sx, False), repeats=repeats),
    }
    for quantizer in quantizers:
        halo.use_compiled_quantizer(quantizer == "compiled")
        for level in levels:
            row[f"halo_l{level}_{quantizer}"] = halo_times(x, w, dy, level, repeats)
            row[f"error_l{level}_{quantizer}"] = halo_errors(x, w, dy, level)
    halo.use_compiled_quantizer(True)
    return row


def quantizer_breakdown(tokens: int, in_features: int, repeats: int) -> dict:
    """Milliseconds of the quantizer's pieces on one activation x [T, I] (bf16), eager and compiled."""
    from quant import halo

    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
    scale = torch.linalg.vector_norm(x, float("inf")).float() / halo.FP8_MAX
    x_fp8 = (x * scale.reciprocal()).to(halo.FP8_DTYPE)
    halo.use_compiled_quantizer(True)
    pieces = {
        "bytes_read_once": x.numel() * x.element_size(),
        "copy_bf16": time_ms(lambda _: x.clone(), repeats=repeats),
        "amax_vector_norm": time_ms(lambda _: torch.linalg.vector_norm(x, float("inf")), repeats=repeats),
        "amax_abs_amax": time_ms(lambda _: x.abs().amax(), repeats=repeats),
        "scale_and_cast": time_ms(lambda _: (x * scale.reciprocal()).to(halo.FP8_DTYPE), repeats=repeats),
        "transpose_fp8": time_ms(lambda _: x_fp8.t().contiguous(), repeats=repeats),
        "transpose_bf16": time_ms(lambda _: x.t().contiguous(), repeats=repeats),
        "rotate_256": time_ms(lambda _: halo.rotate_blocks(x, -1), repeats=repeats),
        "eager_rows": time_ms(lambda _: halo._quantize_math(x, True, False), repeats=repeats),
        "eager_rows_cols": time_ms(lambda _: halo._quantize_math(x, True, True), repeats=repeats),
        "compiled_rows": time_ms(lambda _: halo._quantize(x, True, False), repeats=repeats),
        "compiled_rows_cols": time_ms(lambda _: halo._quantize(x, True, True), repeats=repeats),
    }
    print(f"quantizer pieces, x [{tokens}, {in_features}] bf16: {json.dumps(pieces)}", flush=True)
    return pieces


def halo_errors(x, w, dy, level: int) -> dict:
    """‖HALO − exact‖ / ‖exact‖ of y, dX and dW against fp32 math on the same bf16 inputs (e4m3: ~4%)."""
    from quant.halo import halo_matmul

    x_in, w_in = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = halo_matmul(x_in, w_in, level=level)
    dx, dw = torch.autograd.grad(y, (x_in, w_in), dy)
    x32, w32, dy32 = x.float(), w.float(), dy.float()
    pairs = {"forward": (y, x32 @ w32.t()), "input_grad": (dx, dy32 @ w32), "weight_grad": (dw, dy32.t() @ x32)}
    return {kind: ((got.float() - exact).norm() / exact.norm()).item() for kind, (got, exact) in pairs.items()}


def halo_times(x, w, dy, level: int, repeats: int) -> dict:
    from quant.halo import halo_matmul

    def forward(x_grad: bool, w_grad: bool):
        x_in, w_in = x.detach().requires_grad_(x_grad), w.detach().requires_grad_(w_grad)
        return x_in, w_in, halo_matmul(x_in, w_in, level=level)

    def backward(wrt):
        return lambda state: torch.autograd.grad(state[2], [state[i] for i in wrt], dy)

    return {
        "forward": time_ms(lambda _: forward(True, True), repeats=repeats),
        "input_grad": time_ms(backward([0]), setup=lambda: forward(True, False), repeats=repeats),
        "weight_grad": time_ms(backward([1]), setup=lambda: forward(False, True), repeats=repeats),
        "backward_both": time_ms(backward([0, 1]), setup=lambda: forward(True, True), repeats=repeats),
    }


def e2e_overrides(args, level: int | None) -> list[str]:
    overrides = [
        f"model.preset={args.preset}", "runtime=reference", "device=cuda", "train.precision=bf16",
        "data.source=synthetic", "train.save_final=false", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.lr={args.lr}",
        f"seed={args.seed}",
    ]
    if level is not None:
        overrides += ["quant.mode=halo", f"quant.halo_level={level}"]
    return overrides


def faster_quantizer(gemm: list[dict], level: int) -> str:
    """The quantizer ("compiled" or "eager") whose level-`level` linears took less time per step."""
    totals = {}
    for quantizer in ("compiled", "eager"):
        key = f"halo_l{level}_{quantizer}"
        if gemm and key in gemm[0]:
            totals[quantizer] = sum(row[key]["forward"] + row[key]["backward_both"] for row in gemm)
    return min(totals, key=totals.get) if totals else "compiled"


def e2e_run(args, level: int | None, quantizer: str = "compiled") -> dict:
    from fuyou.config import TrainConfig
    from fuyou.trainer import Trainer
    from quant.halo import use_compiled_quantizer

    overrides = e2e_overrides(args, level)
    use_compiled_quantizer(quantizer == "compiled")
    with tempfile.TemporaryDirectory() as output:
        trainer = Trainer(TrainConfig.from_yaml(args.config, overrides), output_dir=output, progress=False)
        start_s = time.perf_counter()
        trainer.train()
        wall_s = time.perf_counter() - start_s
        steps = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    timed = steps[SKIP_STEPS:]
    losses = [step["loss"] for step in steps]
    result = {
        "mode": "bf16" if level is None else f"halo_l{level}",
        "quantizer": None if level is None else quantizer,
        "command": shlex.join(["fuyou", "train", "--config", args.config, *overrides]),
        "parameters": trainer.num_parameters,
        "steps": len(steps),
        "first_loss": losses[0],
        "final_loss": statistics.fmean(losses[-LAST_STEPS:]),
        "tokens_per_s": sum(s["step_tokens"] for s in timed) / sum(s["step_s"] for s in timed),
        "median_step_s": statistics.median(s["step_s"] for s in timed),
        "first_steps_s": [round(s["step_s"], 3) for s in steps[:SKIP_STEPS]],
        "peak_gpu_bytes": max(s["peak_gpu_bytes"] for s in steps),
        "wall_s": wall_s,
        "losses": losses,
    }
    del trainer
    torch.cuda.empty_cache()
    return result


def print_tables(result: dict) -> None:
    gemm = result.get("gemm", [])
    if gemm:
        variants = [key for key in gemm[0] if key == "fp8_gemm" or key.startswith("halo_")]
        errors = {key: max(row[key][kind] for row in gemm for kind in row[key]) for key in gemm[0] if key.startswith("error_")}
        print("largest relative error of y, dX, dW over the shapes: " + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
        print(f"\nPer GEMM, T = {gemm[0]['T']} tokens: bf16 ms and speedup (bf16 / variant)")
        print("| linear | I → O | GEMM | bf16 ms | " + " | ".join(variants) + " |")
        print("|---|---|---|---|" + "---|" * len(variants))
        for row in gemm:
            for kind in ("forward", "input_grad", "weight_grad"):
                cells = [f"{row['bf16'][kind] / row[v][kind]:.2f}×" for v in variants]
                print(f"| {row['linear']} | {row['I']}→{row['O']} | {kind} | {row['bf16'][kind]:.3f} | " + " | ".join(cells) + " |")
        layers = result["num_layers"]
        for variant in variants:
            kinds = ("forward", "input_grad", "weight_grad") if variant == "fp8_gemm" else ("forward", "backward_both")
            bf16_ms = layers * sum(row["bf16"][k] for row in gemm for k in ("forward", "input_grad", "weight_grad"))
            ms = layers * sum(row[variant][k] for row in gemm for k in kinds)
            print(f"all {layers} blocks' linears, one step: bf16 {bf16_ms:.1f} ms, {variant} {ms:.1f} ms ({bf16_ms / ms:.2f}×)")
    runs = result.get("e2e", [])
    if runs:
        base = next((run for run in runs if run["mode"] == "bf16"), None)
        print(f"\nEnd to end, {result['preset']}, {result['batch_size']} × {result['seq_len']} tokens a step, {runs[0]['steps']} steps")
        print("| mode | final loss (last 10) | vs bf16 | tokens/s | speedup | peak GPU GiB |")
        print("|---|---|---|---|---|---|")
        for run in runs:
            rel = f"{(run['final_loss'] - base['final_loss']) / base['final_loss']:+.2%}" if base else "-"
            speed = f"{run['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base else "-"
            print(f"| {run['mode']}{'' if run.get('quantizer') is None else ' (' + run['quantizer'] + ')'} | {run['final_loss']:.4f} | {rel} | {run['tokens_per_s']:,.0f} | {speed} | {run['peak_gpu_bytes'] / 2**30:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--preset", default="gpt3-1.3b")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2], help="HALO levels timed per GEMM")
    parser.add_argument("--e2e-levels", type=int, nargs="+", default=[0, 1], help="HALO levels trained end to end")
    parser.add_argument("--quantizers", nargs="+", default=["compiled", "eager"], choices=["compiled", "eager"],
                        help="HALO quantizer variants timed per GEMM")
    parser.add_argument("--e2e-bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the bf16 baseline end to end")
    parser.add_argument("--e2e-quantizer", default="auto", choices=["auto", "compiled", "eager"],
                        help="auto: the faster one in part 1 (compiled when part 1 is skipped)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--timing-batch", type=int, default=TIMING["batch"], help="calls timed back to back per sample")
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.halo needs a CUDA GPU", file=sys.stderr)
        return 2
    from fuyou.models import get_preset

    result = {
        "benchmark": "halo", "date": datetime.date.today().isoformat(), "device": _device_name(), "commit": _commit(),
        "command": shlex.join(["python", "-m", "benchmarks.halo", *(argv if argv is not None else sys.argv[1:])]),
        "preset": args.preset, "num_layers": get_preset(args.preset).num_layers,
        "batch_size": args.batch_size, "seq_len": args.seq_len,
    }

    def save():
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    from quant.halo import compiled_quantizer_failed

    TIMING["batch"] = args.timing_batch
    result["timing_batch"] = args.timing_batch

    if not args.skip_gemm:
        tokens = args.batch_size * args.seq_len
        result["quantizer_pieces"] = quantizer_breakdown(tokens, get_preset(args.preset).hidden_size, args.repeats)
        result["gemm"] = gemm_rows(args.batch_size * args.seq_len, linear_shapes(args.preset), args.levels, args.repeats,
                                   args.quantizers)
        result["quantizer_compile_failed"] = compiled_quantizer_failed()
        save()
    if not args.skip_e2e:
        result["e2e"] = []
        for level in ([None] if args.e2e_bf16 else []) + list(args.e2e_levels):
            quantizer = args.e2e_quantizer
            if quantizer == "auto" and level is not None:
                quantizer = faster_quantizer(result.get("gemm", []), level)
            run = e2e_run(args, level, quantizer)
            result["e2e"].append(run)
            result["quantizer_compile_failed"] = compiled_quantizer_failed()
            save()
            print(f"e2e {run['mode']}: final loss {run['final_loss']:.4f}, {run['tokens_per_s']:,.0f} tok/s, "
                  f"first steps {run['first_steps_s']}", flush=True)
    print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
