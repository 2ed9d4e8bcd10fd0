"""DeepSpeed baselines for the Fuyou comparison: the same model, batch and caps under ZeRO-Infinity,
ZeRO-Offload or plain PyTorch, one process, one JSON object out.

    python -m benchmarks.deepspeed_baseline --mode zero-infinity --preset gpt3-1.3b --batch-size 8 \
        --seq-len 2048 --steps 3 --nvme-dir /root/ds-nvme --json-out ds.json
    python -m benchmarks.deepspeed_baseline --aio-sweep --nvme-dir /root/ds-nvme   # measure the aio settings

`--timeline DIR` profiles one more step after the timed ones and draws it as Fuyou's timelines are drawn
(benchmarks.deepspeed_trace): compute, H2D, D2H, SSD read/write, CPU Adam.

The model is `fuyou.models.build_model(get_preset(preset))` (random init, weights in bf16 under DeepSpeed),
driven block by block exactly as Fuyou drives it (`embed`, each of `blocks`, `head`), with every block
checkpointed (`torch.utils.checkpoint`, re-entrant: the variant Hugging Face runs under ZeRO-3), so
both sides recompute each block's forward once in backward. Data are uniform random token ids over the
model's vocabulary with the next id as the target, batch × seq_len per micro-batch; throughput does not
depend on the values. The loss is Fuyou's (`fuyou.reference.causal_lm_loss_sum`, fp32, token mean),
computed in checkpointed chunks of 4096 tokens as Fuyou's schedule does, so neither side holds all logits.

Modes and why each DeepSpeed setting (DeepSpeed 0.19.8):
    zero-infinity  ZeRO stage 3 with `offload_param` and `offload_optimizer` both on NVMe under
        --nvme-dir: the bf16 weights, fp32 masters and both Adam moments live on the disk, the GPU holds
        only the blocks being computed (ZeRO-Infinity paper, the configuration Fuyou's paper compares to).
        - `aio`: block_size, queue_depth and intra_op_parallelism (the key DeepSpeed reads; the older
          `thread_count` is ignored) from `--aio-sweep`, which times DeepSpeed's own aio handle (the
          engine `ds_io`/`ds_nvme_tune` drive) writing and reading 1 GiB O_DIRECT on the target disk.
          The full `ds_nvme_tune` sweep (64 configurations × read/write, a process each) takes longer
          than the whole 10-minute benchmark budget, so the defaults below are that short sweep's choice
          on the H100 machine's one virtio disk (see AIO_DEFAULTS); `single_submit` false and
          `overlap_events` true are DeepSpeed's defaults and its tuner's usual winners.
        - `offload_param.buffer_size`: at least the largest parameter (the 50257-row tied embedding,
          e.g. 131M elements at 2.7B; DeepSpeed refuses a smaller buffer), `buffer_count` 48 with
          `stage3_max_live_parameters` / `max_reuse_distance` at two blocks (PARAM_BUFFER_COUNT).
          `max_in_cpu` 0 so that no weights stay in RAM: the run must really swap.
        - `sub_group_size` 1e8 elements: the optimizer swaps and steps one sub-group at a time; the
          default 1e9 pins 4 × 1e9 × 4 B = 16 GB of buffers, more than the RAM cap allows.
        - `pipeline_read`/`pipeline_write` true: overlap the next sub-group's read and the previous one's
          write with the CPU Adam step (ZeRO-Infinity's overlap; off by default). The pipelined swapper
          holds three sub-groups' fp32 master and moments at once, plus buffers for the moments the first
          step creates: with the default `buffer_count` 4 it asserts "ran out of swap buffers" in step 1
          (seen on the H100 at 1.3B), 8 fails in step 2, 12 runs (checked on the CPU with 11 sub-groups);
          `buffer_count` 16 keeps a margin: 16 × 1e8 × 4 B = 6.4 GB pinned. `--no-pipeline` falls back
          to DeepSpeed's unpipelined default (buffer_count 4 suffices there).
        - `pin_memory` true for both: page-locked staging buffers, needed for async DMA.
    zero-offload   ZeRO stage 2 with `offload_optimizer` on the CPU (pinned): bf16 weights and
        gradients on the GPU, fp32 masters and moments in RAM, DeepSpeedCPUAdam (the ZeRO-Offload
        paper's configuration; stage 2 because with one GPU stage 3 only adds gathering).
    pytorch        plain PyTorch: fp32 weights on the GPU, bf16 autocast, fused AdamW, the same
        checkpointing; run only where 16 bytes per parameter (weights, gradients, two moments) fit the
        GPU cap, else reported as "does not fit" with the bytes it would need.
Common: bf16, AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1, constant lr), clipping at 1.0 (Fuyou's
defaults), overlap_comm and contiguous_gradients on (their defaults at stage 3), the GPU capped with
`torch.cuda.set_per_process_memory_fraction` (default 24 GiB, an RTX 4090).

Measured per step (CUDA synchronised): seconds, loss, and this process's disk traffic from /proc/self/io
(read_bytes/write_bytes; DeepSpeed's aio threads are threads of this process) and, where the kernel
exposes it, /proc/diskstats of the device holding --nvme-dir. Throughput is over the steps after the
first (`--warmup-steps`): tokens/s, model TFLOPS = 6·N·tokens/s and hardware TFLOPS = 8·N·tokens/s
(the recomputed forward counted; attention's S² term is left out of both, as in fuyou.metrics).
Also: peak VRAM (allocated and reserved), peak RSS (this process and reaped children), and the size of
the swap files DeepSpeed wrote under --nvme-dir (apparent and allocated bytes) while the engine is alive.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MODES = ("zero-infinity", "zero-offload", "pytorch")
GIB = 1 << 30
# AdamW and clipping as fuyou.config.TrainSection's defaults.
BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = (0.9, 0.95), 1e-8, 0.1, 1.0
# Bytes per parameter of plain mixed-precision training with fp32 weights: weight, gradient, two moments.
PYTORCH_BYTES_PER_PARAM = 16
RESULT_PREFIX = "DEEPSPEED_BASELINE_RESULT "
HEAD_CHUNK_TOKENS = 4096  # as fuyou.schedule.HEAD_CHUNK_TOKENS: bounds the logits, keeps the head GEMM large
OPTIMIZER_BUFFER_COUNT = 16  # see "pipeline_read" in the module docstring
# NVMe parameter swap buffers (one per live parameter): with the default 5 the first forward asserted
# "Not enough buffers 0 for swapping 1" on the H100 at 1.3B (DeepSpeed's default live-parameter limits
# keep the whole model live); 48 covers the ~12 tensors of each of the ~3 blocks live at once.
PARAM_BUFFER_COUNT = 48


@dataclass(frozen=True)
class AioSettings:
    """DeepSpeed's `aio` block. block_size is bytes; the rest are counts.

    Defaults: the best of `--aio-sweep` on the H100 machine's disk, 2026-11-24 (512 MiB per setting,
    queue depth 32; GB/s write / read): 1 MiB × 1 thread 1.09 / 1.53, 1 MiB × 4 threads 1.60 / 1.16,
    8 MiB × 1 thread 1.28 / 1.17, 8 MiB × 4 threads 1.83 / 1.39 — the best write and the best sum,
    as HARDWARE.md's dd sweep found (8 MiB requests from several threads). Re-run the sweep on
    another disk.
    """

    block_size: int = 8 << 20
    queue_depth: int = 32
    intra_op_parallelism: int = 4
    single_submit: bool = False
    overlap_events: bool = True


AIO_DEFAULTS = AioSettings()


def deepspeed_config(
    mode: str,
    *,
    batch_size: int,
    grad_accum: int,
    lr: float,
    nvme_dir: str | None = None,
    largest_param_numel: int = 0,
    largest_block_numel: int = 100_000_000,
    aio: AioSettings = AIO_DEFAULTS,
    sub_group_size: int = 100_000_000,
    optimizer_buffer_count: int = OPTIMIZER_BUFFER_COUNT,
    pipeline: bool = True,
) -> dict:
    """The DeepSpeed config dict for `mode` (see the module docstring for each choice).

    Args:
        mode: "zero-infinity" or "zero-offload".
        batch_size: micro-batch (sequences per forward).
        grad_accum: micro-batches per optimizer step.
        lr: constant learning rate.
        nvme_dir: swap directory; required for "zero-infinity".
        largest_param_numel: elements of the largest parameter; sizes the NVMe parameter buffers.
        largest_block_numel: elements of one transformer block; bounds the live parameters.
        aio: the async I/O settings.
        sub_group_size: elements per optimizer sub-group (stage 3).
        optimizer_buffer_count: pinned sub-group buffers of the NVMe optimizer swapper.
        pipeline: overlap optimizer swap-in/out with the CPU Adam step (pipeline_read/pipeline_write).

    Raises:
        ValueError: unknown mode, or zero-infinity without nvme_dir.
    """
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "bf16": {"enabled": True},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY},
        },
        "gradient_clipping": MAX_GRAD_NORM,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if mode == "zero-infinity":
        if not nvme_dir:
            raise ValueError("zero-infinity swaps to disk: pass --nvme-dir on the SSD to measure")
        # Round the parameter buffer up to a 1 MiB multiple of elements: aio requests stay block-aligned.
        param_buffer_numel = max(100_000_000, math.ceil(largest_param_numel / (1 << 20)) * (1 << 20))
        config["zero_optimization"] = {
            "stage": 3,
            "offload_param": {
                "device": "nvme",
                "nvme_path": str(nvme_dir),
                "pin_memory": True,
                "buffer_count": PARAM_BUFFER_COUNT,
                "buffer_size": param_buffer_numel,
                "max_in_cpu": 0,
            },
            # Each live parameter holds one swap buffer; DeepSpeed's defaults keep up to 1e9 elements
            # live and reuse them within 1e9 elements, i.e. the whole model: cap both at about two
            # blocks so that PARAM_BUFFER_COUNT buffers suffice.
            "stage3_max_live_parameters": 2 * largest_block_numel,
            "stage3_max_reuse_distance": 2 * largest_block_numel,
            "stage3_prefetch_bucket_size": largest_block_numel,
            "offload_optimizer": {
                "device": "nvme",
                "nvme_path": str(nvme_dir),
                "pin_memory": True,
                "buffer_count": optimizer_buffer_count,
                "pipeline_read": pipeline,
                "pipeline_write": pipeline,
            },
            "sub_group_size": sub_group_size,
            "overlap_comm": True,
            "contiguous_gradients": True,
        }
        config["aio"] = asdict(aio)
    elif mode == "zero-offload":
        config["zero_optimization"] = {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
        }
    else:
        raise ValueError(f"no DeepSpeed config for mode {mode!r}; DeepSpeed modes are zero-infinity, zero-offload")
    return config


def throughput(num_parameters: int, tokens_per_step: int, step_s: list[float], warmup_steps: int = 1) -> dict:
    """Mean step time and rates over the steps after `warmup_steps` (all of them if there are no others).

    Returns:
        mean_step_s, tokens_per_s, model_tflops (6·N per token) and hardware_tflops (8·N per token:
        forward, recomputed forward, backward).
    """
    timed = step_s[warmup_steps:] or step_s
    mean_s = sum(timed) / len(timed)
    tokens_per_s = tokens_per_step / mean_s
    return {
        "mean_step_s": mean_s,
        "tokens_per_s": tokens_per_s,
        "model_tflops": 6 * num_parameters * tokens_per_s / 1e12,
        "hardware_tflops": 8 * num_parameters * tokens_per_s / 1e12,
    }


def proc_io() -> dict[str, int]:
    """This process's /proc/self/io counters (threads included), {} where the file is missing."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return {}
    return {key: int(value) for key, value in (line.split(":") for line in lines if ":" in line)}


def disk_sectors(path: str | os.PathLike) -> dict[str, int] | None:
    """Bytes read and written so far by the block device holding `path` (/proc/diskstats), or None
    where the kernel (gVisor, containers without /proc/diskstats) does not expose it."""
    try:
        device = os.stat(path).st_dev
        major, minor = os.major(device), os.minor(device)
        for line in Path("/proc/diskstats").read_text().splitlines():
            fields = line.split()
            if int(fields[0]) == major and int(fields[1]) == minor:
                return {"device": fields[2], "read_bytes": int(fields[5]) * 512, "write_bytes": int(fields[9]) * 512}
    except (OSError, ValueError, IndexError):
        return None
    return None


def io_delta(before: dict, after: dict) -> dict[str, int]:
    """after − before for the counters both hold."""
    return {key: after[key] - before[key] for key in after if key in before and isinstance(after[key], int)}


def swap_file_bytes(directory: str | os.PathLike | None) -> dict[str, int]:
    """Apparent and allocated (st_blocks × 512) bytes of every file under `directory`: what is on disk."""
    total = {"files": 0, "apparent_bytes": 0, "allocated_bytes": 0}
    if not directory or not os.path.isdir(directory):
        return total
    for root, _, names in os.walk(directory):
        for name in names:
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:
                continue
            total["files"] += 1
            total["apparent_bytes"] += stat.st_size
            total["allocated_bytes"] += stat.st_blocks * 512
    return total


def peak_rss_bytes() -> int:
    """Peak resident set of this process or any reaped child (Linux ru_maxrss is KiB)."""
    return 1024 * max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def checkpointed_module(model, head_chunk_tokens: int = HEAD_CHUNK_TOKENS):
    """An nn.Module whose forward(input_ids_BS, labels_BS) is the summed fp32 token cross-entropy of `model`,
    driven as Fuyou drives it: embed, each block under re-entrant checkpointing, then the head and loss in
    chunks of `head_chunk_tokens` tokens, each checkpointed, so the B×S×V logits never exist at once
    (Fuyou's schedule bounds them the same way). Kept apart from fuyou.models, which knows nothing of training.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from fuyou.reference import causal_lm_loss_sum

    class _Checkpointed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def _head_loss_sum(self, x_BSD, labels_BS):
            return causal_lm_loss_sum(self.inner.head(x_BSD), labels_BS)

        def forward(self, input_ids_BS, labels_BS):
            x_BSD = self.inner.embed(input_ids_BS)
            for block in self.inner.blocks:
                x_BSD = checkpoint(block, x_BSD, use_reentrant=True)
            rows = max(1, head_chunk_tokens // x_BSD.shape[1])
            # Non-re-entrant here: the tied embedding weight is used by the lookup and by every chunk, and a
            # re-entrant chunk would run its own backward, delivering that weight's gradient more than once
            # per step, which ZeRO-3 refuses (a parameter twice in one reduce bucket).
            chunks = [checkpoint(self._head_loss_sum, x_BSD[row : row + rows], labels_BS[row : row + rows], use_reentrant=False)
                      for row in range(0, x_BSD.shape[0], rows)]
            return torch.stack(chunks).sum()

    return _Checkpointed(model)


def _batches(vocab_size: int, batch_size: int, seq_len: int, device, seed: int):
    """Endless uniform random (input_ids_BS, labels_BS): labels are the inputs shifted by one."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        ids_BS1 = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        yield ids_BS1[:, :-1].to(device), ids_BS1[:, 1:].to(device)


def run(args: argparse.Namespace) -> dict:
    """Builds the model, trains `args.steps` steps under `args.mode`, returns the result object."""
    import torch

    from fuyou.models import build_model
    from fuyou.models.presets import get_preset
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    on_gpu = device.type == "cuda"
    cap_bytes = int(args.gpu_memory_gb * GIB)
    if on_gpu:
        torch.cuda.set_device(device)
        total_gpu_bytes = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total_gpu_bytes), device)

    def synchronize() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)
    shape = get_preset(args.preset)
    if args.num_layers:
        shape = shape.replace(num_layers=args.num_layers)
    num_parameters = shape.num_parameters()
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    result = {
        "system": args.mode,
        "preset": args.preset,
        "num_layers": shape.num_layers,
        "parameters": num_parameters,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens_per_step,
        "gpu_cap_bytes": cap_bytes,
        "nvme_dir": args.nvme_dir,
    }
    if args.mode == "pytorch" and on_gpu and PYTORCH_BYTES_PER_PARAM * num_parameters > cap_bytes:
        return {**result, "fits": False, "need_bytes": PYTORCH_BYTES_PER_PARAM * num_parameters,
                "reason": f"{PYTORCH_BYTES_PER_PARAM} B/param (fp32 weights, grads, 2 moments) exceed the GPU cap"}

    aio_trace = None
    if args.timeline and args.mode != "pytorch":
        from benchmarks.deepspeed_trace import AioTrace

        aio_trace = AioTrace()
    init_start_s = time.perf_counter()
    io_start, disk_start = proc_io(), disk_sectors(args.nvme_dir) if args.nvme_dir else None
    dtype = torch.float32 if args.mode == "pytorch" else torch.bfloat16
    model = build_model(shape, device="cpu", dtype=dtype, seed=args.seed)
    largest_param_numel = max(parameter.numel() for parameter in model.parameters())
    largest_block_numel = max(sum(p.numel() for p in block.parameters()) for block in model.blocks)
    module = checkpointed_module(model)
    config = None
    if args.mode == "pytorch":
        module = module.to(device)
        optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, betas=BETAS, eps=EPS,
                                      weight_decay=WEIGHT_DECAY, fused=True)
    else:
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(args.deepspeed_log_level)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if args.mode == "zero-infinity":
            Path(args.nvme_dir).mkdir(parents=True, exist_ok=True)
        aio = AioSettings(args.aio_block_size, args.aio_queue_depth, args.aio_intra_op_parallelism)
        config = deepspeed_config(args.mode, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                                  nvme_dir=args.nvme_dir, largest_param_numel=largest_param_numel,
                                  largest_block_numel=largest_block_numel, aio=aio,
                                  sub_group_size=args.sub_group_size, optimizer_buffer_count=args.optimizer_buffer_count,
                                  pipeline=not args.no_pipeline)
        deepspeed.init_distributed(dist_backend=args.dist_backend or ("nccl" if on_gpu else "gloo"))
        # The head multiplies by token_embedding.weight outside that module's forward: ZeRO-3 must gather it
        # for the whole forward of the wrapper, not only for the embedding lookup.
        if args.mode == "zero-infinity":
            deepspeed.zero.register_external_parameter(module, model.token_embedding.weight)
        if aio_trace is not None:
            aio_trace.install(disk=args.mode == "zero-infinity")
        module, optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    synchronize()
    result["init_s"] = time.perf_counter() - init_start_s
    result["init_io"] = io_delta(io_start, proc_io())
    result["deepspeed_config"] = config

    batches = _batches(shape.vocab_size, args.batch_size, args.seq_len, device, args.seed)

    def train_step(micro_batches) -> float:
        """One optimizer step; returns the mean loss per target token."""
        loss_sum = 0.0
        for input_ids_BS, labels_BS in micro_batches:
            if args.mode == "pytorch":
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = module(input_ids_BS, labels_BS) / (labels_BS.numel() * args.grad_accum)
                loss.backward()
            else:
                # DeepSpeed divides by gradient_accumulation_steps itself: pass the micro-batch mean.
                loss = module(input_ids_BS, labels_BS) / labels_BS.numel()
                module.backward(loss)
                module.step()
            loss_sum += loss.detach()
        if args.mode == "pytorch":
            torch.nn.utils.clip_grad_norm_(module.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss_sum) / (1 if args.mode == "pytorch" else args.grad_accum)

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    steps = []
    try:
        for step in range(1, args.steps + 1):
            micro_batches = [next(batches) for _ in range(args.grad_accum)]
            io_before = proc_io()
            disk_before = disk_sectors(args.nvme_dir) if args.nvme_dir else None
            synchronize()
            start_s = time.perf_counter()
            loss_value = train_step(micro_batches)
            synchronize()
            step_s = time.perf_counter() - start_s
            disk_after = disk_sectors(args.nvme_dir) if args.nvme_dir else None
            steps.append({
                "step": step,
                "step_s": step_s,
                "loss": loss_value,
                "io": io_delta(io_before, proc_io()),
                "disk": io_delta(disk_before, disk_after) if disk_before and disk_after else None,
            })
            print(f"step {step}: {step_s:.2f} s loss {loss_value:.4f} io {steps[-1]['io']}", file=sys.stderr, flush=True)
    except torch.cuda.OutOfMemoryError as error:
        return {**result, "fits": False, "reason": f"CUDA out of memory in step {len(steps) + 1}: {str(error)[:300]}",
                "peak_vram_allocated_bytes": torch.cuda.max_memory_allocated(device) if on_gpu else 0, "steps": steps}
    result["swap_files"] = swap_file_bytes(args.nvme_dir) if args.mode == "zero-infinity" else None
    result["total_io"] = io_delta(io_start, proc_io())
    disk_end = disk_sectors(args.nvme_dir) if args.nvme_dir else None
    result["total_disk"] = io_delta(disk_start, disk_end) if disk_start and disk_end else None
    timed = steps[args.warmup_steps:] or steps
    result.update(
        fits=True,
        steps=steps,
        measured_steps=[s["step"] for s in timed],
        **throughput(num_parameters, tokens_per_step, [s["step_s"] for s in steps], args.warmup_steps),
        ssd_read_bytes_per_step=sum(s["io"].get("read_bytes", 0) for s in timed) / len(timed),
        ssd_write_bytes_per_step=sum(s["io"].get("write_bytes", 0) for s in timed) / len(timed),
        peak_vram_allocated_bytes=torch.cuda.max_memory_allocated(device) if on_gpu else 0,
        peak_vram_reserved_bytes=torch.cuda.max_memory_reserved(device) if on_gpu else 0,
        peak_rss_bytes=peak_rss_bytes(),
    )
    if args.timeline:
        # One more step, outside the figures above (the profiler slows the host side), drawn as a timeline.
        from benchmarks.deepspeed_trace import LANES, profiled
        from fuyou.timeline import Timeline, write_timeline_files

        micro_batches = [next(batches) for _ in range(args.grad_accum)]
        synchronize()
        with profiled(aio_trace) as spans:
            start_s = time.perf_counter()
            train_step(micro_batches)
            synchronize()
            end_s = time.perf_counter()
        title = f"{args.mode}: {args.preset} batch {args.batch_size}x{args.seq_len}x{args.grad_accum}, step {args.steps + 1} (profiled, untimed)"
        try:
            result["timeline"] = write_timeline_files(Timeline.of(spans, start_s, end_s, LANES, title), Path(args.timeline))
        except Exception as error:  # noqa: BLE001 - a drawing problem must not lose the measured steps above
            result["timeline"] = {"error": f"{type(error).__name__}: {error}"}
    return result


def aio_sweep(nvme_dir: str, num_bytes: int = GIB) -> list[dict]:
    """Times DeepSpeed's aio handle writing then reading `num_bytes` (O_DIRECT, pinned buffer) per setting.

    A short form of `ds_nvme_tune`: block size 1 or 8 MiB × intra-op parallelism 1 or 4 at queue depth
    32, one process, so it fits the benchmark budget. Returns one row per setting with GB/s.
    """
    import torch
    from deepspeed.ops.op_builder import AsyncIOBuilder

    aio_module = AsyncIOBuilder().load(verbose=False)
    Path(nvme_dir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(nvme_dir, "aio_sweep.bin")
    buffer = torch.empty(num_bytes, dtype=torch.uint8)
    if torch.cuda.is_available():  # as DeepSpeed's swap buffers are; a CPU-only torch cannot pin
        buffer = buffer.pin_memory()
    buffer.random_(0, 255)
    rows = []
    try:
        for block_size in (1 << 20, 8 << 20):
            for parallelism in (1, 4):
                handle = aio_module.aio_handle(block_size=block_size, queue_depth=32, single_submit=False,
                                               overlap_events=True, intra_op_parallelism=parallelism)
                start_s = time.perf_counter()
                handle.sync_pwrite(buffer, path)
                write_s = time.perf_counter() - start_s
                start_s = time.perf_counter()
                handle.sync_pread(buffer, path)
                read_s = time.perf_counter() - start_s
                rows.append({"block_size": block_size, "queue_depth": 32, "intra_op_parallelism": parallelism,
                             "write_gbps": num_bytes / write_s / 1e9, "read_gbps": num_bytes / read_s / 1e9})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if os.path.exists(path):
            os.remove(path)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="zero-infinity")
    parser.add_argument("--preset", default="gpt3-1.3b")
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the throughput means")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-gb", type=float, default=24.0)
    parser.add_argument("--nvme-dir", default=None, help="swap directory (zero-infinity); its disk is measured")
    parser.add_argument("--aio-block-size", type=int, default=AIO_DEFAULTS.block_size)
    parser.add_argument("--aio-queue-depth", type=int, default=AIO_DEFAULTS.queue_depth)
    parser.add_argument("--aio-intra-op-parallelism", type=int, default=AIO_DEFAULTS.intra_op_parallelism)
    parser.add_argument("--sub-group-size", type=int, default=100_000_000)
    parser.add_argument("--optimizer-buffer-count", type=int, default=OPTIMIZER_BUFFER_COUNT)
    parser.add_argument("--no-pipeline", action="store_true", help="zero-infinity: no pipeline_read/pipeline_write")
    parser.add_argument("--deepspeed-log-level", default="WARNING")
    parser.add_argument("--dist-backend", default=None, help="torch.distributed backend of the one-process group "
                        "(default nccl on cuda, gloo on cpu)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: check the plumbing on a machine without a GPU (DeepSpeed's CPU accelerator); no timing meaning")
    parser.add_argument("--json-out", default=None, help="also write the result object here")
    parser.add_argument("--timeline", default=None, metavar="DIR",
                        help="after the timed steps, profile one more (untimed) step and draw it into DIR "
                             "(timeline.png, trace.json, lanes.json; benchmarks.deepspeed_trace)")
    parser.add_argument("--aio-sweep", action="store_true", help="only time the aio settings under --nvme-dir")
    parser.add_argument("--aio-sweep-bytes", type=int, default=GIB, help="bytes written and read per aio setting")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.aio_sweep:
        if not args.nvme_dir:
            print("--aio-sweep needs --nvme-dir", file=sys.stderr)
            return 2
        rows = aio_sweep(args.nvme_dir, args.aio_sweep_bytes)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    if args.mode == "zero-infinity" and not args.nvme_dir:
        print("zero-infinity swaps to disk: pass --nvme-dir on the SSD to measure", file=sys.stderr)
        return 2
    start_s = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - start_s
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(RESULT_PREFIX + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
