"""QLoRA: our path against the standard Hugging Face recipe, same model shape, batch and sequence (issue 7).

    python -m benchmarks.qlora [--preset llama3-8b] [--batch-size 1] [--seq-len 2048] [--steps 6]
                               [--variants hf ours ours-ckpt ours-stream] [--num-layers N] [--gpu-memory-gb G]
                               [--prefetch-depth D] [--stream-cache-gb G] [--compile] [--profile] [--json PATH]
    python -m benchmarks.qlora --preset llama3-70b --variants ours-stream --gpu-memory-gb 24 --batch-size 2

Both start from random weights (no downloads) and train LoRA rank 16 (alpha 32, dropout 0.05) on every
block linear over a frozen NF4 base (bitsandbytes, double quantization, bf16 compute) with bitsandbytes'
paged AdamW 8-bit, on the same synthetic batches, under bf16 autocast, and compute the loss the same way
(fp32 cross-entropy over the target tokens). The recipe steps bitsandbytes' `PagedAdamW8bit` as shipped (one
device sync per parameter); ours steps the same optimizer through `quant.qlora.PagedAdamW` (one sync per step,
bitwise the same updates).

    hf         transformers.LlamaForCausalLM built from the preset's config in bf16 on the GPU, its linears
               (all but lm_head) replaced by bnb.nn.Linear4bit(nf4, compress_statistics=True, bf16 compute):
               the modules `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
               bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16))`
               creates, without writing a 16 GB checkpoint first; then peft.prepare_model_for_kbit_training
               (non-4-bit weights to fp32, input grads), gradient checkpointing (use_reentrant=False), and
               peft LoRA on q/k/v/o/gate/up/down_proj.
    ours       what `fuyou train ... quant.mode=qlora quant.optimizer_bits=8` runs (quant.qlora.prepare_qlora,
               make_paged_adamw, the reference trainer; our Transformer with fused qkv and gate_up
               projections), no activation checkpointing; the fp32 model is initialised on the GPU.
    ours-ckpt  the same with train.activation_checkpointing=true.
    ours-stream  what `fuyou train ... quant.mode=qlora quant.stream=true` runs (quant/qlora_stream.py): the
               model built on "meta" and materialised one block at a time on the GPU (fp32, N(0, 0.02) drawn
               there), each block quantized to NF4 and its payload put in pinned CPU memory through the tiered
               store; blocks fetched `--prefetch-depth` ahead in forward and backward, every block
               checkpointed and recomputed, embedding and head frozen in bf16, loss in 1024-token chunks.
               The GPU cap (--gpu-memory-gb) is the store's and binds from before the build.
    --compile  our variants with train.compile=true (fuyou.block_compile: each block through one
               torch.compile graph; the first step compiles, and is among the steps left out of tokens/s).

Each variant runs in its own process, so its peak memory is its own. Reported: tokens/s over the steps
after the first two, torch's peak allocated and reserved GPU bytes during the steps (bitsandbytes' paged
optimizer state lives in CUDA managed memory, outside torch's counts; for rank-16 adapters it is ~0.1 GB),
the process's GPU use at the end from cudaMemGetInfo, and for ours-stream the NF4 bytes in pinned CPU
memory and the bytes streamed to the GPU per step. With --gpu-memory-gb, hf is capped from its start and
ours / ours-ckpt from after their build (which holds the fp32 model on the GPU: 32 GB at 8B).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.kernels import group_times, profile_kernels
from benchmarks.run import _commit, _device_name

LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.05}
SKIP_STEPS = 2
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["hf", "ours", "ours-ckpt", "ours-stream"]
VARIANT_TIMEOUT_S = 480


def ours_overrides(args, checkpointing: bool, stream: bool = False) -> list[str]:
    """The `fuyou train` overrides of the run `run_ours` / `run_stream` does (recorded as its command)."""
    overrides = [
        f"model.preset={args.preset}", "runtime=reference", "device=cuda", "train.precision=bf16",
        "data.source=synthetic", "train.save_final=false", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", "train.lr=2e-4",
        "quant.mode=qlora", "quant.optimizer_bits=8", f"quant.lora_rank={LORA['rank']}",
        f"quant.lora_alpha={LORA['alpha']}", f"quant.lora_dropout={LORA['dropout']}",
        f"train.activation_checkpointing={str(checkpointing).lower()}",
    ]
    if args.compile:
        overrides.append("train.compile=true")
    if stream:
        overrides += ["quant.stream=true", f"offload.prefetch_depth={args.prefetch_depth}"]
        if args.stream_cache_gb:
            overrides.append(f"quant.stream_cache_gb={args.stream_cache_gb:g}")
        if args.gpu_memory_gb is not None:
            overrides.append(f"offload.gpu_memory_gb={args.gpu_memory_gb}")
    if args.num_layers is not None:
        overrides.append(f"model.num_layers={args.num_layers}")
    return overrides


def synthetic_batches(args):
    from fuyou.data import build_dataset
    from fuyou.tokenizer import load_tokenizer

    dataset = build_dataset(source="synthetic", tokenizer=load_tokenizer("byte"), seq_len=args.seq_len, seed=0,
                            format="auto", pack=True)
    return dataset.batches(args.batch_size)


def model_config(args):
    from fuyou.models import get_preset

    config = get_preset(args.preset)
    return config if args.num_layers is None else config.replace(num_layers=args.num_layers)


@torch.no_grad()
def init_on_gpu(module) -> None:
    """N(0, 0.02) weights, unit norms, zero biases, drawn on the GPU: seconds where the Trainer's seeded CPU
    draw takes about a minute for 8B parameters (and ten for 70B); neither step time nor memory changes."""
    from torch import nn

    for submodule in module.modules():
        if isinstance(submodule, (nn.Linear, nn.Embedding)):
            submodule.weight.normal_(0.0, 0.02)
        elif getattr(submodule, "weight", None) is not None:
            submodule.weight.fill_(1.0)
        if getattr(submodule, "bias", None) is not None:
            submodule.bias.zero_()


@dataclass
class StepLoss:
    loss: float


def time_steps(args, step) -> tuple[list[float], list[float], dict]:
    """(seconds, loss) of each of `args.steps` calls of step([batch]); peak memory counts from here.

    With --profile, one more step runs under torch.profiler, and the third item holds what its kernels
    add up to: `profile_kernel_s` (compute kernels, copies and memsets left out), `profile_kernels`
    (their number) and `profile_copy_s`. Kernel time over the unprofiled median step is the share of
    the step the GPU computes; the rest is the GPU waiting, for the host to launch work or for copies.
    """
    batches = synthetic_batches(args)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step_s, losses = [], []
    for _ in range(args.steps):
        start_s = time.perf_counter()
        losses.append(step([next(batches)]).loss)  # .item() inside synchronises
        step_s.append(time.perf_counter() - start_s)
    if not args.profile:
        return step_s, losses, {}
    by_name, copy_s, num_kernels = profile_kernels(lambda: step([next(batches)]))
    top = sorted(by_name.items(), key=lambda item: -item[1])[:15]
    return step_s, losses, {
        "profile_kernel_s": sum(by_name.values()),
        "profile_kernels": num_kernels,
        "profile_copy_s": copy_s,
        "profile_kernel_groups_s": group_times(by_name, KERNEL_GROUPS),
        "profile_top_kernels_s": [[name[:120], seconds] for name, seconds in top],
    }


KERNEL_GROUPS = [  # (group, name fragments), first match wins: bitsandbytes' kernels before the GEMMs
    ("nf4 (bitsandbytes)", ("dequantize", "4bit", "kQuantize", "kDequant")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "s16816", "wgmma")),
    ("fused (Inductor)", ("triton_",)),
    ("reduction", ("reduce", "norm", "softmax", "cross_entropy", "nll_loss")),
]


def run_ours(args, checkpointing: bool) -> dict:
    """What `fuyou train` does for quant.mode=qlora (fuyou.Trainer._apply_quant + ReferenceTrainer), but with
    the fp32 model initialised on the GPU (`init_on_gpu`)."""
    from fuyou.models import build_model
    from fuyou.reference import ReferenceTrainer
    from offload import GiB, cap_gpu_memory
    from quant.qlora import make_paged_adamw, prepare_qlora

    build_start_s = time.perf_counter()
    model = build_model(model_config(args), device="meta").to_empty(device="cuda")
    init_on_gpu(model)
    model = prepare_qlora(model, rank=LORA["rank"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    optimizer = make_paged_adamw(model, lr=2e-4, weight_decay=0.1, optim_bits=8)
    trainer = ReferenceTrainer(model, lr=2e-4, warmup_steps=0, total_steps=args.steps, weight_decay=0.1,
                               max_grad_norm=1.0, precision="bf16", activation_checkpointing=checkpointing,
                               optimizer=optimizer, compile_blocks=args.compile)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - build_start_s
    if args.gpu_memory_gb is not None:
        torch.cuda.empty_cache()  # the fp32 model's blocks, cached by the allocator since quantization
        cap_gpu_memory(int(args.gpu_memory_gb * GiB))
    step_s, losses, profile = time_steps(args, trainer.step)
    return {
        **profile,
        "command": "equivalent to: " + shlex.join(["fuyou", "train", "--config", "configs/tiny.yaml",
                                                   *ours_overrides(args, checkpointing)]),
        "build_s": build_s,
        "step_s": step_s,
        "losses": losses,
        "tokens_per_step": args.batch_size * args.seq_len,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def run_stream(args) -> dict:
    """What `fuyou train ... quant.stream=true` does (fuyou.Trainer._streamed_qlora), with `init_on_gpu`."""
    import functools

    from fuyou.models import build_model
    from offload import GiB, TieredStore
    from quant.qlora import make_paged_adamw
    from quant.qlora_stream import StreamedQLoRA, build_streamed_qlora

    def materialize(piece, device):
        piece.to_empty(device=device)
        init_on_gpu(piece)

    build_start_s = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    cap_bytes = None if args.gpu_memory_gb is None else int(args.gpu_memory_gb * GiB)
    store = TieredStore(gpu_cap_bytes=cap_bytes, device=device)  # caps this process's GPU memory from here on
    model = build_model(model_config(args), device="meta")
    model, payloads = build_streamed_qlora(model, store=store, device=device,
                                           materialize=functools.partial(materialize, device=device),
                                           rank=LORA["rank"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    optimizer = make_paged_adamw(model, lr=2e-4, weight_decay=0.1, optim_bits=8)
    trainer = StreamedQLoRA(model, payloads, store, device=device, optimizer=optimizer, lr=2e-4, warmup_steps=0,
                            total_steps=args.steps, max_grad_norm=1.0, precision="bf16", prefetch_depth=args.prefetch_depth,
                            cache_bytes=int(args.stream_cache_gb * GiB), compile_blocks=args.compile)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - build_start_s
    build_peak_allocated_bytes = torch.cuda.max_memory_allocated()
    print(f"ours-stream: built in {build_s:.1f} s, NF4 {trainer.nf4_bytes / 1e9:.2f} GB in pinned CPU memory", file=sys.stderr, flush=True)
    h2d_before = store.moved_bytes["h2d"]
    step_s, losses, profile = time_steps(args, trainer.step)
    h2d_bytes = store.moved_bytes["h2d"] - h2d_before
    steps = args.steps + (1 if profile else 0)
    result = {
        **profile,
        "command": "equivalent to: " + shlex.join(["fuyou", "train", "--config", "configs/tiny.yaml",
                                                   *ours_overrides(args, checkpointing=True, stream=True)]),
        "build_s": build_s,
        "step_s": step_s,
        "losses": losses,
        "tokens_per_step": args.batch_size * args.seq_len,
        "trainable_parameters": sum(p.numel() for p in trainer.trainable),
        "build_peak_allocated_bytes": build_peak_allocated_bytes,
        "nf4_pinned_bytes": trainer.nf4_bytes,
        "pinned_pool_peak_bytes": store.pool.report()["peak_bytes"],
        "gpu_store_peak_bytes": store.gpu_budget.peak_bytes,
        "streamed_bytes_per_step": h2d_bytes / steps,
        "gpu_cap_bytes": cap_bytes,
        "prefetch_depth": args.prefetch_depth,
        "stream_cache_gb": args.stream_cache_gb,
        "cache_plan": {"linears": len(trainer.cache.plan.chosen), "bytes": trainer.cache.plan.num_bytes,
                       "recompute_flops_saved_per_micro_batch": trainer.cache.plan.flops_saved,
                       "recompute_flops_skipped_per_micro_batch": trainer.cache.plan.skipped_flops,
                       "peak_bytes": trainer.cache.peak_bytes},
    }
    trainer.close()
    return result


def build_hf(args, device: str = "cuda"):
    """The standard recipe's model (module docstring), on `device`."""
    import bitsandbytes as bnb  # noqa: F401 - fail early if the wheel is missing
    import peft
    import transformers

    from fuyou.models.hf import config_to_hf
    from quant.qlora import quantize_linears_nf4

    hf_dict = config_to_hf(model_config(args))
    hf_dict.pop("model_type"), hf_dict.pop("architectures")
    hf_config = transformers.LlamaConfig(**hf_dict)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(torch.float32)
    quantize_linears_nf4(model, compute_dtype=torch.bfloat16)  # the Linear4bit modules from_pretrained makes
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    if not model.is_gradient_checkpointing:  # prepare_... enables it only for models flagged as loaded in 4 bit
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules=HF_TARGETS, bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)


def run_hf(args) -> dict:
    import bitsandbytes as bnb

    from fuyou.reference import causal_lm_loss_sum

    if args.gpu_memory_gb is not None:
        from offload import GiB, cap_gpu_memory

        cap_gpu_memory(int(args.gpu_memory_gb * GiB))
    build_start_s = time.perf_counter()
    model = build_hf(args)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(trainable, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - build_start_s

    def step(micro_batches):
        (batch,) = micro_batches
        input_ids, labels = batch.input_ids.cuda(), batch.labels.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):  # what HF Trainer(bf16=True) does
            logits = model(input_ids=input_ids).logits
        loss = causal_lm_loss_sum(logits, labels) / max(1, batch.num_target_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepLoss(loss.item())  # synchronises

    step_s, losses, profile = time_steps(args, step)
    return {
        "command": "python -m benchmarks.qlora --variants hf (the recipe in the module docstring)",
        "build_s": build_s,
        "step_s": step_s,
        "losses": losses,
        "tokens_per_step": args.batch_size * args.seq_len,
        "trainable_parameters": sum(p.numel() for p in trainable),
        **profile,
    }


def run_variant(args) -> dict:
    variant = args.variant
    if variant == "hf":
        result = run_hf(args)
    elif variant == "ours-stream":
        result = run_stream(args)
    else:
        result = run_ours(args, checkpointing=variant == "ours-ckpt")
    timed = result["step_s"][SKIP_STEPS:] or result["step_s"]
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    result.update(
        variant=variant,
        tokens_per_s=result["tokens_per_step"] * len(timed) / sum(timed),
        median_step_s=statistics.median(timed),
        peak_allocated_bytes=torch.cuda.max_memory_allocated(),
        peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        device_used_bytes_at_end=total_bytes - free_bytes,
    )
    return result


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU cap per variant (see the docstring)")
    parser.add_argument("--prefetch-depth", type=int, default=1, help="ours-stream: blocks fetched ahead")
    parser.add_argument("--stream-cache-gb", type=float, default=0.0,
                        help="ours-stream: GiB of frozen linears' outputs kept for the recompute (quant.stream_cache_gb)")
    parser.add_argument("--variant-timeout-s", type=float, default=VARIANT_TIMEOUT_S)
    parser.add_argument("--compile", action="store_true", help="our variants with train.compile=true (not hf)")
    parser.add_argument("--profile", action="store_true", help="one more step under torch.profiler: GPU kernel time")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant in this process (the worker)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.qlora needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.variant is not None:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0

    result = {
        "benchmark": "qlora", "date": datetime.date.today().isoformat(), "device": _device_name(), "commit": _commit(),
        "command": shlex.join(["python", "-m", "benchmarks.qlora", *(argv if argv is not None else sys.argv[1:])]),
        "preset": args.preset, "num_layers": args.num_layers, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "gpu_memory_gb": args.gpu_memory_gb, "compile": args.compile, "lora": LORA, "runs": [],
    }
    worker = [sys.executable, "-m", "benchmarks.qlora", "--preset", args.preset, "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--prefetch-depth", str(args.prefetch_depth),
              "--stream-cache-gb", str(args.stream_cache_gb)]
    if args.num_layers is not None:
        worker += ["--num-layers", str(args.num_layers)]
    if args.gpu_memory_gb is not None:
        worker += ["--gpu-memory-gb", str(args.gpu_memory_gb)]
    if args.profile:
        worker.append("--profile")
    if args.compile:
        worker.append("--compile")
    for variant in args.variants:
        try:
            completed = subprocess.run([*worker, "--variant", variant], check=False, capture_output=True, text=True,
                                       timeout=args.variant_timeout_s)
            returncode, stdout, stderr = completed.returncode, completed.stdout, completed.stderr
        except subprocess.TimeoutExpired as expired:  # its output so far, as bytes despite text=True
            returncode, stdout = "timeout", _text(expired.stdout)
            stderr = f"timed out after {args.variant_timeout_s:.0f} s\n" + _text(expired.stderr)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if returncode != 0 or not lines:
            print(f"{variant} failed (exit {returncode}):\n{stderr[-3000:]}", flush=True)
            result["runs"].append({"variant": variant, "error": stderr[-3000:]})
        else:
            result["runs"].append(json.loads(lines[-1].removeprefix("RESULT ")))
            run = result["runs"][-1]
            print(f"{variant}: {run['tokens_per_s']:,.0f} tok/s, peak allocated {run['peak_allocated_bytes'] / 2**30:.2f} GiB, "
                  f"build {run['build_s']:.0f} s, losses {[round(x, 3) for x in run['losses']]}", flush=True)
            if "profile_kernel_s" in run:
                print(f"{variant}: profiled step: {run['profile_kernels']:,} kernels, {run['profile_kernel_s']:.3f} s of kernels "
                      f"({run['profile_kernel_s'] / run['median_step_s']:.0%} of the median step), "
                      f"{run['profile_copy_s']:.3f} s of copies; by group: "
                      + ", ".join(f"{group} {seconds:.3f}" for group, seconds in run["profile_kernel_groups_s"].items()), flush=True)
            if "nf4_pinned_bytes" in run:
                print(f"{variant}: NF4 in pinned CPU memory {run['nf4_pinned_bytes'] / 1e9:.2f} GB, streamed "
                      f"{run['streamed_bytes_per_step'] / 1e9:.1f} GB per step, GPU store peak "
                      f"{run['gpu_store_peak_bytes'] / 1e9:.2f} GB", flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    ok = [run for run in result["runs"] if "error" not in run]
    base = next((run for run in ok if run["variant"] == "hf"), None)
    cap = "" if args.gpu_memory_gb is None else f", GPU cap {args.gpu_memory_gb:g} GiB"
    print(f"\nQLoRA, {args.preset}{'' if args.num_layers is None else f' ({args.num_layers} layers)'}, "
          f"batch {args.batch_size} × {args.seq_len}, LoRA r{LORA['rank']}, paged AdamW 8-bit{cap}")
    print("| variant | tokens/s | × hf | peak allocated GiB | × hf | peak reserved GiB | GPU used at end GiB | trainable params |")
    print("|---|---|---|---|---|---|---|---|")
    for run in ok:
        speed = f"{run['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        memory = f"{run['peak_allocated_bytes'] / base['peak_allocated_bytes']:.2f}" if base else "-"
        print(f"| {run['variant']} | {run['tokens_per_s']:,.0f} | {speed} | {run['peak_allocated_bytes'] / 2**30:.2f} | {memory} | "
              f"{run['peak_reserved_bytes'] / 2**30:.2f} | {run['device_used_bytes_at_end'] / 2**30:.2f} | "
              f"{run['trainable_parameters'] / 1e6:.1f}M |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
