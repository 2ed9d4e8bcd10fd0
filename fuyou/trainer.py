"""`Trainer`: the one place that wires a config to a model, data and a runtime.

The CLI parses arguments and calls this class; the Python API is the same class:

    from fuyou import Trainer, TrainConfig
    summary = Trainer(TrainConfig.from_yaml("configs/tiny.yaml", ["train.steps=20"]), output_dir="runs/x").train()

Everything that can be wrong with the input (config, data, model directory, memory, disk space,
output directory) is checked in `__init__`, before a byte is written, and raised as a one-line
`FuyouError`. `train()` then writes, under `output_dir`:
    config.yaml     the resolved config
    metrics.jsonl   one JSON object per optimizer step (see fuyou.metrics)
    final/          a Hugging Face directory (config.json + safetensors [+ tokenizer.json]),
                    written to a temporary name and renamed, so it is never half-written.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import psutil
import torch
import yaml

from fuyou.config import TrainConfig
from fuyou.data import build_dataset, check_vocab
from fuyou.errors import ConfigError, FuyouError
from fuyou.measure import Meter, flops_per_token
from fuyou.metrics import MetricsLog, StepMetrics, TrainSummary, model_tflops, peak_cpu_bytes, peak_gpu_bytes, progress_postfix
from fuyou.models import Initializer, build_model, from_pretrained, resolve_config, save_pretrained
from fuyou.reference import ReferenceTrainer
from fuyou.runtime import FuyouRuntime, Placement, check_fuyou_memory
from fuyou.tokenizer import HFTokenizer, load_tokenizer

OUTPUT_FILES = ("config.yaml", "metrics.jsonl", "final", "final-merged")

# fp32 weights + fp32 gradients + AdamW's two fp32 moments, per parameter. Activations come on top.
REFERENCE_BYTES_PER_PARAM = 16


class Trainer:
    """Fine-tunes one model as `config` says.

    Args:
        config: the run (see fuyou.config).
        output_dir: where config.yaml, metrics.jsonl and final/ go; None writes nothing.
        overwrite: allow an `output_dir` that already holds a previous run's files (they are replaced).
        progress: show a progress bar on stderr.

    Raises:
        FuyouError: anything wrong with the input, with a one-line message that says how to fix it.
    """

    def __init__(self, config: TrainConfig, *, output_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True):
        config.validate()
        self.config = config
        self.progress = progress
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.overwrite = overwrite
        self.device = _resolve_device(config.device)
        if config.train.compile and self.device.type != "cuda":  # device=auto on a machine without a GPU
            raise ConfigError("train.compile needs device=cuda (Inductor on the CPU needs a C++ compiler and gains little); drop train.compile")
        self.plan_report = None
        self.hardware = None  # a HardwareProfile of this machine: the utilisation's peak
        if config.hardware is not None:
            from fuyou.plan import HardwareProfile

            self.hardware = HardwareProfile.from_yaml(config.hardware)
        if config.plan == "auto":
            config, self.plan_report = _apply_plan(config, self.device)
            self.config = config
            if progress:
                print(f"fuyou: plan: {self.plan_report.prediction.plan.describe()}", file=sys.stderr)
        train = config.train
        self.precision = train.precision if train.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")

        self.model_config = resolve_config(**vars(config.model))
        self.tokenizer = load_tokenizer(_resolve_tokenizer_spec(config))
        check_vocab(self.tokenizer, self.model_config.vocab_size)
        if train.seq_len > self.model_config.max_seq_len:
            raise ConfigError(
                f"train.seq_len={train.seq_len} exceeds the model's max_seq_len={self.model_config.max_seq_len}; "
                f"lower train.seq_len or raise model.max_seq_len"
            )
        self.num_parameters = self.model_config.num_parameters()
        streamed = config.quant.mode == "qlora" and config.quant.stream
        if streamed:
            # Only the blocks in flight, adapters, checkpoints and the bf16 embedding/head are on the GPU,
            # under offload.gpu_memory_gb; the NF4 blocks are in pinned CPU memory (the pool's cap).
            _warn_ignored_offload_keys(config)
        elif config.runtime == "reference":
            # QLoRA's peak is the fp32 model built before its block linears become NF4.
            if config.quant.mode == "qlora":
                _check_memory(self.num_parameters, self.device, bytes_per_param=4,
                              fix="set quant.stream=true (the model is built and quantized block by block into CPU "
                                  "memory and its 4-bit blocks stream to the GPU)")
            else:
                _check_memory(self.num_parameters, self.device,
                              fix="set runtime=fuyou (states offloaded to CPU memory or SSD)")
            if config.offload != type(config.offload)():
                warnings.warn("the offload section is ignored by runtime=reference, which keeps every state on one device")
        else:
            placement = _fuyou_placement(config)  # validates before anything is built
            # A randomly initialised model is built block by block inside the runtime (from "meta"), so
            # the whole model never exists in fp32 at once; a checkpoint is loaded whole first.
            build_lazily = config.model.path is None and config.quant.mode == "none"
            # Nothing needs a group's gradient after its own update without accumulation or clipping.
            gradient_ring = config.offload.gradient_ring if train.grad_accum == 1 and train.max_grad_norm is None else 0
            check_fuyou_memory(
                build_model(self.model_config, device="meta"), placement, config.offload.ssd_dir,
                block_dtype=torch.bfloat16 if self.precision == "bf16" else torch.float32, gradient_ring=gradient_ring,
                activation_numel=train.batch_size * train.seq_len * self.model_config.hidden_size, built_whole=not build_lazily,
            )
        self._check_output_dir()

        self.dataset = build_dataset(
            source=config.data.source,
            tokenizer=self.tokenizer,
            seq_len=train.seq_len,
            seed=config.seed,
            format=config.data.format,
            pack=config.data.pack,
        )
        torch.manual_seed(config.seed)
        # The Fuyou runtime takes the model from CPU memory and places its states itself.
        model_device = self.device if config.runtime == "reference" and not streamed else torch.device("cpu")
        initializer = None
        if config.model.path is not None:
            self.model = from_pretrained(config.model.path, device=model_device, dtype=torch.float32)
        elif config.runtime == "fuyou" and build_lazily:
            # The same values build_model(seed=config.seed) gives, drawn piece by piece (fuyou.models.Initializer).
            self.model = build_model(self.model_config, device="meta", dtype=torch.float32)
            initializer = Initializer(self.model, seed=config.seed)
        elif streamed:  # materialised and quantized block by block (quant.qlora_stream)
            self.model = build_model(self.model_config, device="meta", dtype=torch.float32)
        else:
            self.model = build_model(self.model_config, device=model_device, dtype=torch.float32, seed=config.seed)
        optimizer = None if streamed else self._apply_quant(config)
        optimization = dict(
            lr=train.lr,
            warmup_steps=train.warmup_steps,
            total_steps=train.steps,
            min_lr_ratio=train.min_lr_ratio,
            weight_decay=train.weight_decay,
            betas=(train.beta1, train.beta2),
            eps=train.eps,
            max_grad_norm=train.max_grad_norm,
            precision=self.precision,
        )
        if streamed:
            self.runtime = self._streamed_qlora(config, optimization)
            self.model = self.runtime.model
        elif config.runtime == "reference":
            self.runtime = ReferenceTrainer(
                self.model, activation_checkpointing=train.activation_checkpointing, optimizer=optimizer,
                compile_blocks=train.compile, **optimization
            )
        else:
            offload = config.offload
            self.runtime = FuyouRuntime(
                self.model,
                device=self.device,
                **optimization,
                **vars(placement),
                gpu_memory_gb=offload.gpu_memory_gb,
                cpu_memory_gb=offload.cpu_memory_gb,
                ssd_dir=offload.ssd_dir,
                prefetch_depth=offload.prefetch_depth,
                micro_batch_tokens=train.batch_size * train.seq_len,
                gradient_ring=gradient_ring,
                initializer=initializer,
                compile_blocks=train.compile,
            )
        self._batches = self.dataset.batches(train.batch_size)
        self.steps_done = 0
        self.tokens_done = 0

    def train(self) -> TrainSummary:
        """Runs `train.steps` optimizer steps; returns the summary (also on Ctrl-C, for the steps done).

        The summary's measurement (fuyou.measure) covers the steps after the first, which pays
        one-time start-up (allocator warm-up, kernel selection), unless the run has only one step.
        """
        from tqdm import tqdm

        train = self.config.train
        metrics_path = None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for name in OUTPUT_FILES:  # only reached with overwrite=True or an empty directory
                _remove(self.output_dir / name)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            metrics_path = self.output_dir / "metrics.jsonl"
        log = MetricsLog(metrics_path)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        history: list[StepMetrics] = []
        meter = self.meter().start(reset_peaks=False) if train.steps == 1 else None
        measurement = None
        start_s = time.perf_counter()
        bar = tqdm(total=train.steps, unit="step", dynamic_ncols=True, disable=not self.progress, desc="train")
        try:
            for step in range(1, train.steps + 1):
                metrics = self.step()
                if meter is not None:
                    meter.add_step(metrics.step_tokens)
                history.append(metrics)
                log.write(metrics)
                if step % train.log_every == 0 or step == train.steps:
                    bar.set_postfix_str(progress_postfix(metrics), refresh=False)
                bar.update(1)
                if meter is None and step == 1:
                    # Step 1's queued updates finish first, so the window holds each measured step's
                    # work once: its own updates (drained at the end), not also step 1's.
                    self.drain()
                    meter = self.meter().start(reset_peaks=False)  # peaks stay "since the run began"
            self.drain()
            measurement = meter.stop()
            if self.output_dir is not None and train.save_final:
                self._save_final()
        except KeyboardInterrupt:
            bar.write(f"interrupted after {len(history)} of {train.steps} steps; metrics so far are kept, no final model saved")
            if not history:
                raise
            return TrainSummary.from_steps(history, time.perf_counter() - start_s, _str(self.output_dir))
        finally:
            bar.close()
            log.close()
            if meter is not None:
                meter.close()
            self.close()  # swap files go with it
        return TrainSummary.from_steps(history, time.perf_counter() - start_s, _str(self.output_dir), measurement)

    def step(self) -> StepMetrics:
        """One optimizer step over the next `train.grad_accum` micro-batches; its metrics.

        Raises:
            FuyouError: the GPU ran out of memory (with what to change).
        """
        train = self.config.train
        step = self.steps_done + 1
        step_start_s = time.perf_counter()
        micro_batches = [next(self._batches) for _ in range(train.grad_accum)]
        try:
            result = self.runtime.step(micro_batches)
        except torch.cuda.OutOfMemoryError:
            # runtime=fuyou always checkpoints per block; what it can still move off the GPU are the checkpoints.
            if self.config.quant.stream:
                also = "lower quant.stream_cache_gb or offload.prefetch_depth"  # it already checkpoints every block
            elif self.config.runtime == "reference":
                also = "set train.activation_checkpointing=true"
            else:
                also = "set offload.activations=cpu"
            raise FuyouError(
                f"GPU out of memory in step {step} (batch {train.batch_size} x {train.seq_len} tokens); "
                f"lower train.batch_size (and raise train.grad_accum) or {also}"
            ) from None
        if self.config.quant.mode == "halo" and self.config.quant.halo_scaling == "delayed":
            from quant.delayed_scaling import end_step

            end_step(self.model)  # this step's amaxes join the history the next step scales by
        step_s = time.perf_counter() - step_start_s  # .item() in step() synchronised the device
        self.steps_done = step
        self.tokens_done += result.num_tokens
        return StepMetrics(
            step=step,
            loss=result.loss,
            lr=result.lr,
            grad_norm=result.grad_norm,
            tokens=self.tokens_done,
            step_tokens=result.num_tokens,
            step_s=step_s,
            tokens_per_s=result.num_tokens / step_s,
            model_tflops=model_tflops(self.num_parameters, result.num_tokens, step_s),
            peak_gpu_bytes=peak_gpu_bytes(self.device),
            peak_cpu_bytes=peak_cpu_bytes(),
        )

    def meter(self) -> Meter:
        """A `Meter` (not started) for this run's device, model, runtime and hardware profile."""
        model, train = self.model_config, self.config.train
        placement = self.runtime.placement if isinstance(self.runtime, FuyouRuntime) else None
        # their recomputes skip each block's down projection, a plain nn.Linear's (HALO's FP8 linear runs whole)
        skips_last_linear = (self.config.runtime == "fuyou" and self.config.quant.mode != "halo") or self.config.quant.stream
        per_token = flops_per_token(
            self.num_parameters, model.num_block_parameters(), model.num_layers, runtime=self.config.runtime,
            activations=placement.activations if placement else None,
            activation_checkpointing=train.activation_checkpointing or self.config.quant.stream,  # streamed QLoRA recomputes
            skipped_parameters=model.ffn_size * model.hidden_size if skips_last_linear else 0,
        )
        hardware = self.hardware
        peak = hardware.gpu_tflops if hardware is not None and hardware.compute_device == self.device.type else None
        fuyou = isinstance(self.runtime, FuyouRuntime)
        return Meter(self.device, num_parameters=self.num_parameters, flops_per_token=per_token, peak_tflops=peak,
                     store=getattr(self.runtime, "store", None),  # runtime=fuyou's, or streamed QLoRA's
                     optimizer=self.runtime.optimizer if fuyou else None)

    def drain(self) -> None:
        """Wait for the work the last step queued: CPU updates, their copies, the device's queue."""
        if isinstance(self.runtime, FuyouRuntime):
            for key in self.runtime.optimizer.groups:
                self.runtime.optimizer.ready(key).result()
            self.runtime.store.synchronize()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Release the runtime (its optimizer thread, pinned memory and swap files); idempotent."""
        if hasattr(self.runtime, "close"):  # runtime=fuyou, streamed QLoRA
            self.runtime.close()

    def _streamed_qlora(self, config: TrainConfig, optimization: dict):
        """quant.stream: self.model (on "meta", or loaded on the CPU) quantized block by block into a tiered
        store's pinned CPU memory, LoRA on the GPU; returns the `StreamedQLoRA` that trains it."""
        from offload import GiB, TieredStore
        from quant.qlora import make_paged_adamw
        from quant.qlora_stream import StreamedQLoRA, build_streamed_qlora

        quant, offload, cuda = config.quant, config.offload, self.device.type == "cuda"
        store = TieredStore(
            cpu_cap_bytes=None if offload.cpu_memory_gb is None else int(offload.cpu_memory_gb * GiB),
            gpu_cap_bytes=None if offload.gpu_memory_gb is None or not cuda else int(offload.gpu_memory_gb * GiB),
            device=self.device if cuda else None,
        )
        try:
            # The values build_model(seed=config.seed) gives, drawn piece by piece on the CPU.
            materialize = None
            if config.model.path is None:
                initializer = Initializer(self.model, seed=config.seed)
                materialize = functools.partial(initializer.materialize, device=self.device)
            targets = [name.strip() for name in quant.lora_targets.split(",")] if quant.lora_targets else None
            model, payloads = build_streamed_qlora(
                self.model, store=store, device=self.device, materialize=materialize, rank=quant.lora_rank,
                alpha=quant.lora_alpha, dropout=quant.lora_dropout, target_modules=targets,
            )
            optimizer = make_paged_adamw(model, lr=optimization["lr"], betas=optimization["betas"], eps=optimization["eps"],
                                         weight_decay=optimization["weight_decay"], optim_bits=quant.optimizer_bits)
            schedule = {key: optimization[key] for key in ("lr", "warmup_steps", "total_steps", "min_lr_ratio", "max_grad_norm", "precision")}
            return StreamedQLoRA(model, payloads, store, device=self.device, optimizer=optimizer,
                                 prefetch_depth=offload.prefetch_depth, cache_bytes=int(quant.stream_cache_gb * GiB),
                                 compile_blocks=config.train.compile, **schedule)
        except BaseException:
            store.close()
            raise

    def _apply_quant(self, config: TrainConfig):
        """Applies quant.mode to self.model in place; returns the optimizer QLoRA needs, else None."""
        quant, train = config.quant, config.train
        if quant.mode == "halo":
            from quant.halo import apply_halo

            apply_halo(self.model, level=quant.halo_level, scaling=quant.halo_scaling, amax_history=quant.halo_amax_history)
        elif quant.mode == "qlora":
            from quant.qlora import make_paged_adamw, prepare_qlora

            targets = [name.strip() for name in quant.lora_targets.split(",")] if quant.lora_targets else None
            self.model = prepare_qlora(self.model, rank=quant.lora_rank, alpha=quant.lora_alpha, dropout=quant.lora_dropout,
                                       target_modules=targets)
            return make_paged_adamw(self.model, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps,
                                    weight_decay=train.weight_decay, optim_bits=quant.optimizer_bits)
        return None

    def _save_final(self) -> None:
        """Writes final/ under a temporary name first, so an interrupted save leaves no half model."""
        assert self.output_dir is not None
        staging = self.output_dir / ".final.partial"
        _remove(staging)
        if isinstance(self.runtime, FuyouRuntime):
            self.runtime.sync_model()
        if self.config.quant.mode == "qlora":
            from quant.qlora import save_adapters, save_merged

            save_adapters(self.model, staging)
            if self.config.quant.save_merged:
                merged = self.output_dir / ".final-merged.partial"
                _remove(merged)
                save_merged(self.model, merged, block_scope=getattr(self.runtime, "resident", None))
                os.replace(merged, self.output_dir / "final-merged")
        else:
            save_pretrained(self.model, staging)
        if isinstance(self.tokenizer, HFTokenizer):
            shutil.copyfile(self.tokenizer.path, staging / "tokenizer.json")
        os.replace(staging, self.output_dir / "final")

    def _check_output_dir(self) -> None:
        if self.output_dir is None:
            return
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output {out} is a file; pass a directory")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise ConfigError(f"output directory {out} is not empty; pass a new --output directory or --overwrite to replace its run")
        quant = self.config.quant
        # QLoRA's final/ holds only the adapters; final-merged/ (save_merged) is a whole model.
        if self.config.train.save_final and (quant.mode != "qlora" or quant.save_merged):
            need_bytes = self.num_parameters * 4 * 1.05  # fp32 safetensors plus headers and config
            existing = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
            free_bytes = shutil.disk_usage(existing).free
            if need_bytes > free_bytes:
                raise FuyouError(
                    f"saving the final model needs {need_bytes / 1e9:.1f} GB under {existing}, {free_bytes / 1e9:.1f} GB free; "
                    f"free space, choose another --output, or set train.save_final=false"
                )


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but PyTorch sees no CUDA GPU; use device=cpu or device=auto")
    return torch.device(name)


def _apply_plan(config: TrainConfig, device: torch.device):
    """The config with the planner's placement, micro-batch and prefetch depth (plan: auto).

    The step keeps the config's batch (train.batch_size x train.grad_accum tokens) and seq_len; the
    planner prices candidates on `config.hardware`, or on a quick probe of this machine.

    Raises:
        FuyouError: no placement fits the caps (the message names the short resource).
    """
    from fuyou.plan import HardwareProfile
    from fuyou.plan.probe import probe
    from fuyou.plan.report import plan_config

    if config.hardware is not None:
        hardware = HardwareProfile.from_yaml(config.hardware)
    else:
        hardware = probe(config.offload.ssd_dir, quick=True, log=lambda line: None)
    if hardware.compute_device != device.type:
        raise ConfigError(
            f"hardware profile {config.hardware} describes a {hardware.compute_device} machine but this run computes on "
            f"{device.type}; use a profile of this machine (fuyou probe) or drop hardware= to probe it"
        )
    report = plan_config(config, hardware)
    if not report.feasible:
        raise FuyouError(f"plan=auto: {report.error}")
    return config.with_overrides(report.prediction.plan.config_overrides(), origin="plan"), report


def _resolve_tokenizer_spec(config: TrainConfig) -> str:
    spec = config.data.tokenizer
    if spec != "auto":
        return spec
    if config.model.path is not None and (Path(config.model.path) / "tokenizer.json").is_file():
        return config.model.path
    return "byte"


def _check_memory(num_parameters: int, device: torch.device, bytes_per_param: int = REFERENCE_BYTES_PER_PARAM,
                  fix: str = "pick a smaller model.preset") -> None:
    """Refuses a model whose weights, gradients and AdamW state cannot fit on the device at all; `fix`
    names the setting that makes it fit."""
    need_bytes = num_parameters * bytes_per_param
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        where = "GPU"
    else:
        free_bytes = psutil.virtual_memory().available
        where = "CPU"
    if need_bytes > free_bytes:
        raise FuyouError(
            f"runtime=reference needs about {need_bytes / 1e9:.1f} GB of {where} memory for {num_parameters / 1e9:.2f}B parameters "
            f"({bytes_per_param} bytes per parameter before activations), {free_bytes / 1e9:.1f} GB free; "
            f"{fix}, or pick a smaller model.preset"
        )


def _warn_ignored_offload_keys(config: TrainConfig) -> None:
    """Streamed QLoRA reads offload.gpu_memory_gb, cpu_memory_gb and prefetch_depth; it places nothing else."""
    offload, defaults = config.offload, type(config.offload)()
    ignored = [f"offload.{name}" for name in ("params", "optimizer", "activations", "ssd_dir", "optimizer_cpu_blocks", "gradient_ring",
                                              "outer_optimizer")
               if getattr(offload, name) != getattr(defaults, name)]
    if ignored:
        warnings.warn(f"{', '.join(ignored)} ignored by quant.stream, which keeps NF4 blocks in pinned CPU memory "
                      "and everything else on the compute device")


def _fuyou_placement(config: TrainConfig) -> Placement:
    """offload.* as a Placement; unset entries take the defaults until the planner (issue 5) exists."""
    offload, defaults = config.offload, Placement()
    split = offload.optimizer_cpu_blocks is not None  # a split of the optimizer state implies it is on ssd
    return Placement(
        params=offload.params or defaults.params,
        optimizer=offload.optimizer or ("ssd" if split else defaults.optimizer),
        activations=offload.activations or defaults.activations,
        optimizer_cpu_blocks=offload.optimizer_cpu_blocks,
        outer_optimizer=offload.outer_optimizer,
    )


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None
