"""Where a HALO (or bf16) reference-trainer step spends its GPU time, by kernel group (issue 7 diagnosis).

    python -m benchmarks.diag.halo_step [--variants bf16 halo0] [--batch-size 4] [--foreach-adamw] [--compile]
                                        [--kernels-json PATH] ...

For each variant it builds the `fuyou.Trainer` that `benchmarks.halo`'s end-to-end part builds (reference
runtime, bf16 autocast, fp32 masters, synthetic data; `quant.mode=halo` for haloN), runs `--warmup` steps
(compiles), times `--steps` steps, then profiles one more with torch.profiler and sums its CUDA kernels
by group: bf16 GEMMs, FP8 GEMMs, attention, Inductor's fused kernels, the optimizer, the loss, the rest.
Kernel time against the median step says how much of the step the GPU computes at all.

`--foreach-adamw` swaps the trainer's torch AdamW (fused on CUDA since the reference adopted it) for the
foreach one, torch's default on CUDA, with the same groups and hyper-parameters: what the optimizer costs
each mode. A `-delayed` variant (e.g. `halo0-delayed`) sets `quant.halo_scaling=delayed`, which at level 0 on
CUDA runs the MLP with its GELU inside `quant.fp8_cast`'s casts (`quant.halo_mlp`); `-delayed-torchcast`
runs it as two HaloLinears casting with torch ops instead, as before that kernel existed. The attention's
linears cast dY by the library's defaults unless told: `-lineardy` casts the out-projection's dY with the kernel
too (`quant.halo.use_kernel_for_linear_dy`), `-catdy` concatenates the QKV projection's dq, dk, dv for torch-op
casts instead of the kernel reading them in place (`quant.halo.use_kernel_for_split_dy`). `-noweightk` casts the
weights with torch ops (`quant.halo.use_kernel_for_weights`), `-noxk` the out-projection's x
(`quant.halo.use_kernel_for_opaque_inputs`), `-noxt` leaves x's transposed copy to Inductor
(`quant.halo.use_kernel_for_x_transpose`). `-tileRxCxW` launches `quant.fp8_cast`'s "none" prologue (every
cast without a GELU) with that tile, e.g. `-tile128x64x4`. `-mlpdy`, the
fourteenth session's name for the defaults of then, is accepted and changes nothing. A `-sampled` variant (e.g. `halo0-sampled`) takes each tensor's FP8 scale from the amax of every
64th row instead of the whole tensor, clamping what overflows: the quantizer's cast then waits on a reduction
over 1/64 of the data, about what delayed scaling (last step's amax) would cost. A timing bound only, its
numerics are not HALO's. `--kernels-json` writes every profiled kernel's total milliseconds and launches per
variant, and the step's longest GPU idle gaps with the kernels around them. Variants alternate in one process,
so compare them within one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

import quant.halo
from benchmarks.kernels import group_times, profile_kernels

_QUANTIZE_MATH = quant.halo._quantize_math
_DEFAULT_TILES: dict = {}  # quant.fp8_cast's own tiles, kept when a variant overrides one (build)

KERNEL_GROUPS = [  # (group, lower-case name fragments); first match wins, FP8 before the other GEMMs
    ("gemm fp8", ("e4m3", "f8f8", "fp8", "_qqt", "_qqs", "f8_")),  # cuBLAS's nvjet: qq = FP8 A and B
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm bf16", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "s16816", "wgmma", "sm90")),
    ("optimizer", ("multi_tensor", "adam", "foreach", "fused_adam")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "softmax")),
    ("fused (Inductor)", ("triton_",)),
    ("reduction", ("reduce", "norm")),
]


def _sampled_quantize_math(x_RC: torch.Tensor, rows: bool, cols: bool, state_row=None, delayed: bool = False):
    """quant.halo._quantize_math with the amax of every 64th row (see the module docstring); records nothing."""
    from quant.halo import FP8_DTYPE, FP8_MAX

    amax = torch.linalg.vector_norm(x_RC[::64], float("inf")).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    x_fp8 = (x_RC.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (x_fp8 if rows else None), (x_fp8.t().contiguous() if cols else None), scale


def build(args, variant: str):
    from fuyou.config import TrainConfig
    from fuyou.reference import adamw_param_groups
    from fuyou.trainer import Trainer

    overrides = [
        f"model.preset={args.preset}", "runtime=reference", "device=cuda", "train.precision=bf16",
        "data.source=synthetic", "train.save_final=false", f"train.steps={args.warmup + args.steps + 1}",
        f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", "train.lr=1e-4", "seed=0",
        f"train.compile={'true' if args.compile else 'false'}",
    ]
    variant, *flags = variant.split("-")
    tiles = [flag for flag in flags if flag.startswith("tile")]
    import quant.fp8_cast

    default_tile = _DEFAULT_TILES.setdefault("none", quant.fp8_cast.TILES["none"])
    quant.fp8_cast.TILES["none"] = tuple(int(n) for n in tiles[0][4:].split("x")) if tiles else default_tile
    unknown = set(flags) - {"sampled", "delayed", "torchcast", "mlpdy", "lineardy", "catdy", "noweightk", "noxk",
                            "noxt", *tiles}
    if unknown:
        raise SystemExit(f"unknown variant suffix {sorted(unknown)}; use -sampled, -delayed, -torchcast, -lineardy, "
                         "-catdy, -noweightk, -noxk, -noxt or -tileRxCxW")
    delayed = "delayed" in flags
    quant.halo.use_fused_cast("torchcast" not in flags)
    quant.halo.use_kernel_for_linear_dy("lineardy" in flags)
    quant.halo.use_kernel_for_split_dy("catdy" not in flags)
    quant.halo.use_kernel_for_weights("noweightk" not in flags)
    quant.halo.use_kernel_for_opaque_inputs("noxk" not in flags)
    quant.halo.use_kernel_for_x_transpose("noxt" not in flags)
    quant.halo._quantize_math = _sampled_quantize_math if "sampled" in flags else _QUANTIZE_MATH
    torch._dynamo.reset()  # variants alternate in one process: trace the quantizer each one uses afresh
    if variant.startswith("halo"):
        overrides += ["quant.mode=halo", f"quant.halo_level={int(variant[4:])}"]
        if delayed:
            overrides.append("quant.halo_scaling=delayed")
    output = tempfile.mkdtemp(prefix="halo-step-")
    trainer = Trainer(TrainConfig.from_yaml(args.config, overrides), output_dir=output, progress=False)
    if args.foreach_adamw:
        old = trainer.runtime.optimizer
        defaults = old.defaults
        trainer.runtime.optimizer = torch.optim.AdamW(
            adamw_param_groups(trainer.model, old.param_groups[0]["weight_decay"]), lr=defaults["lr"],
            betas=defaults["betas"], eps=defaults["eps"], foreach=True, fused=False)
    return trainer


def profile_step(trainer, top: int) -> dict:
    detail: dict = {}
    by_name_s, _, num_kernels = profile_kernels(trainer.step, detail)
    by_name = {name: seconds * 1e3 for name, seconds in by_name_s.items()}
    ranked = sorted(by_name.items(), key=lambda item: -item[1])
    gaps_ms = [(us / 1e3, before, after) for us, before, after in detail["gaps"]]
    return {"kernel_ms": sum(by_name.values()), "kernels": num_kernels, "groups_ms": group_times(by_name, KERNEL_GROUPS),
            "top": ranked[:top], "all": [(name, ms, detail["calls"][name]) for name, ms in ranked],
            "idle_ms": sum(gap[0] for gap in gaps_ms), "gaps": gaps_ms}


def print_scaled_mm_calls(trainer) -> None:
    """One more step under torch.profiler with shapes: every aten::_scaled_mm call's operand shapes and dtypes
    (the output dtype is among its arguments), with how often it ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        trainer.step()
    calls: dict[str, int] = {}
    for event in profiler.events():
        if event.name.startswith("aten::_scaled_mm"):
            key = f"{event.name} shapes {event.input_shapes} types {getattr(event, 'input_types', '?')}"
            key += f" args {[a for a in getattr(event, 'concrete_inputs', []) if a not in (None, [], '')]}"
            calls[key] = calls.get(key, 0) + 1
    for key, count in sorted(calls.items(), key=lambda item: -item[1]):
        print(f"    {count:4d} x {key[:400]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--preset", default="gpt3-1.3b")
    parser.add_argument("--variants", nargs="+", default=["bf16", "halo0"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--foreach-adamw", action="store_true")
    parser.add_argument("--kernels-json", default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--scaled-mm-calls", action="store_true", help="also list the _scaled_mm calls' dtypes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for variant in args.variants:
        trainer = build(args, variant)
        for _ in range(args.warmup):
            trainer.step()
        step_s = []
        for _ in range(args.steps):
            start_s = time.perf_counter()
            trainer.step()
            step_s.append(time.perf_counter() - start_s)
        median_ms = statistics.median(step_s) * 1e3
        prof = profile_step(trainer, args.top)
        tag = f"{variant} b{args.batch_size}{' foreach-adamw' if args.foreach_adamw else ''}"
        print(f"{tag}: median step {median_ms:.1f} ms, kernels {prof['kernel_ms']:.1f} ms ({prof['kernels']}), "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        for name, ms in prof["top"]:
            print(f"    {ms:7.2f} ms  {name[:110]}")
        print(f"    GPU idle between kernels: {prof['idle_ms']:.1f} ms in {len(prof['gaps'])} gaps; longest:")
        for ms, before, after in prof["gaps"][:6]:
            print(f"    {ms:7.2f} ms  after {before[:60]}  before {after[:60]}")
        if args.scaled_mm_calls and variant.startswith("halo"):
            print_scaled_mm_calls(trainer)
        rows.append((tag, median_ms, prof))
        del trainer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if args.kernels_json:
        with open(args.kernels_json, "w") as file:
            json.dump({tag: {"median_step_ms": median_ms, "kernels_ms": prof["all"], "gaps_ms": prof["gaps"][:200]} for tag, median_ms, prof in rows}, file, indent=1)
    groups = sorted({g for _, _, p in rows for g in p["groups_ms"]})
    print("\nvariant | median step ms | kernel ms | " + " | ".join(groups))
    for tag, median_ms, prof in rows:
        print(f"{tag} | {median_ms:.1f} | {prof['kernel_ms']:.1f} | "
              + " | ".join(f"{prof['groups_ms'].get(g, 0.0):.1f}" for g in groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
