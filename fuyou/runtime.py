"""`FuyouRuntime`: full fine-tuning with weights, optimizer state and activations placed across GPU/CPU/SSD.

It exposes `step(micro_batches) -> StepResult` like `fuyou.reference.ReferenceTrainer`, and must give
the same losses (tests/test_runtime_parity.py). The step itself is `fuyou.schedule`; this module
builds what the schedule streams: the placement, the tiered store, the flat per-block weights and the
CPU optimizer.

Placement (`Placement`): each state class on "gpu", "cpu" or "ssd".
    params       the compute-precision copy of each block's weights that forward and backward stream
                 ("gpu": resident on the compute device, no streaming). On a machine without CUDA the
                 compute device is the CPU, and "gpu" means "on the compute device".
    optimizer    fp32 master weights and AdamW moments; "cpu" or "ssd" (the optimizer runs on the CPU).
    activations  each block's checkpointed input between forward and backward: "gpu" kept on the
                 compute device, "cpu"/"ssd" swapped out and back ahead of backward, "none" nothing
                 kept but the embedding output (x_0): backward recomputes every block input from it.

State layout (what a checkpoint must hold; SIGKILL-safe resume is a later issue). Groups are "outer"
(embedding, position embedding, final norm, LM head: every parameter outside `blocks`) and
"block.{j}" for j in 0..L-1. Each group is two flat "parts", in `named_parameters()` order:
    part 0  parameters with ndim >= 2 (weight decay applies)
    part 1  parameters with ndim < 2 (norm scales, biases: no decay)
(`FlatLayout` gives names, shapes and offsets.) In the store:
    optim.{group}.{part}         fp32 [3, n]: master weight, exp_avg, exp_avg_sq   (optimizer tier)
    param.block.{j}.{part}       part 0 in the compute dtype (bf16 or fp32), part 1 fp32, [n]
                                 (params tier; derived from the master, need not be saved)
    the outer group's weights    fp32 on the compute device (the model's own parameters)
    Adam step count              per group (`OffloadedAdamW.groups[g].step`), equal at step boundaries
    step index                   `FuyouRuntime.step_index` (drives the LR schedule)
A checkpoint is therefore: the masters and moments of every (group, part), the step count and the
step index; the data position and RNG belong to the trainer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Sequence

import torch

from fuyou.data import Batch
from fuyou.errors import ConfigError, FuyouError
from fuyou.lr_schedule import lr_at_step
from fuyou.reference import StepResult
from fuyou.schedule import FuyouSchedule
from offload import GiB, TieredStore
from offload.activations import ActivationSwap
from offload.cpu_optimizer import OffloadedAdamW
from offload.futures import completed, gather, then
from offload.pinned import round_up
from offload.store import Tier

STATE_PLACEMENTS = ("gpu", "cpu", "ssd")
ACTIVATION_PLACEMENTS = ("gpu", "cpu", "ssd", "none")


@dataclass(frozen=True)
class Placement:
    """Where each state class lives (module docstring). Defaults until the planner (issue 5) exists."""

    params: str = "cpu"
    optimizer: str = "cpu"
    activations: str = "cpu"

    def __post_init__(self) -> None:
        if self.params not in STATE_PLACEMENTS:
            raise ConfigError(f"offload.params must be one of {', '.join(STATE_PLACEMENTS)}; got {self.params!r}")
        if self.optimizer not in ("cpu", "ssd"):
            raise ConfigError(f"offload.optimizer={self.optimizer!r}: the Fuyou optimizer runs on the CPU, so its state lives on cpu or ssd")
        if self.activations not in ACTIVATION_PLACEMENTS:
            raise ConfigError(f"offload.activations must be one of {', '.join(ACTIVATION_PLACEMENTS)}; got {self.activations!r}")

    @property
    def uses_ssd(self) -> bool:
        return "ssd" in (self.params, self.optimizer, self.activations)


@dataclass(frozen=True)
class FlatLayout:
    """Where each named parameter sits in one flat buffer."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, named: Sequence[tuple[str, torch.Tensor]]) -> FlatLayout:
        offsets, total = [], 0
        for _, tensor in named:
            offsets.append(total)
            total += tensor.numel()
        return cls(tuple(n for n, _ in named), tuple(t.shape for _, t in named), tuple(offsets), total)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: flat[o : o + shape.numel()].view(shape) for name, shape, o in zip(self.names, self.shapes, self.offsets)}

    def flatten(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).to(dtype or t.dtype) for t in tensors])


def split_parts(named: Sequence[tuple[str, torch.Tensor]]) -> list[FlatLayout]:
    """Part 0: ndim >= 2 (decayed, as `fuyou.reference.adamw_param_groups`); part 1: the rest."""
    return [FlatLayout.of([(n, p) for n, p in named if p.ndim >= 2]), FlatLayout.of([(n, p) for n, p in named if p.ndim < 2])]


class BlockWeights:
    """Each block's streamed weights (`param.block.{j}.{part}`) and the gradients' way to the CPU."""

    def __init__(self, store: TieredStore, optimizer: OffloadedAdamW, layouts: list[list[FlatLayout]],
                 dtypes: list[torch.dtype], tier: Tier, compute_tier: Tier) -> None:
        self.store, self.optimizer, self.layouts, self.dtypes = store, optimizer, layouts, dtypes
        self.tier, self.compute_tier = tier, compute_tier
        self.resident = tier is compute_tier  # params "gpu": compute reads the home itself

    def name(self, j: int, part: int) -> str:
        return f"param.block.{j}.{part}"

    def put(self, j: int, masters: list[torch.Tensor]) -> None:
        for part, (master, dtype) in enumerate(zip(masters, self.dtypes)):
            self.store.put(self.name(j, part), master.to(dtype), self.tier).result()

    def publish(self, j: int, masters: list[torch.Tensor]) -> Future:
        """Cast updated fp32 masters (CPU) to the compute dtype and write them to block j's home.

        A home in CPU memory takes the cast directly (one pass over the block, not a cast into a
        staging buffer and a copy); other homes get the cast through a staging buffer and `copy()`.
        """
        if self.tier is Tier.CPU:
            for part, master in enumerate(masters):
                self.store.settled(self.name(j, part)).copy_(master)
            return completed()
        moves = []
        for part, (master, dtype) in enumerate(zip(masters, self.dtypes)):
            work = self.store.empty(master.shape, dtype, Tier.CPU)
            work.copy_(master)
            moves.append(self.store.write_back(self.name(j, part), work))
            self.store.free(work)  # after the write-back, which the store tracks
        return gather(moves)

    def fetch(self, j: int) -> Future:
        """Block j's parts on the compute device, once its latest update is home."""
        ready = self.optimizer.ready(f"block.{j}")
        if self.resident:
            names = [self.name(j, part) for part in range(len(self.dtypes))]
            return then(ready, lambda: completed([self.store.home(n) for n in names]))
        return then(ready, lambda: gather([self.store.fetch(self.name(j, part), self.compute_tier) for part in range(len(self.dtypes))]))

    def release(self, j: int, parts: list[torch.Tensor]) -> None:
        if not self.resident:
            for part in parts:
                self.store.free(part)

    def views(self, j: int, parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        views = {}
        for layout, part in zip(self.layouts[j], parts):
            views.update(layout.views(part))
        return views

    def offload_grads(self, key: str, grads: list[torch.Tensor], *, first: bool, last: bool) -> None:
        """Copy one micro-batch's gradient parts to the CPU and queue their accounting there.

        Gradients cross PCIe as fp32, cast on the compute device: twice the bytes of bf16, but the
        CPU then adds fp32 into fp32, while adding bf16 into fp32 in place takes torch's slow
        mixed-dtype path (measured 0.66 against 4.5 Gelem/s on 2 cores, and 8.3 s of every 2.7B step
        at grad_accum 4 on the H100 host). The values accumulated are the same.

        The CPU passes are memory-bound and were most of the step (issue-4 table in
        benchmarks/RESULTS.md), so each is avoided where it can be: the step's first micro-batch lands
        in the accumulators directly (no copy pass), and when it is also the last (grad_accum 1) the
        compute device takes the norms (no norm pass); later micro-batches land in staging buffers and
        are added in one pass.
        """
        grads = [grad.float().contiguous() for grad in grads]
        if first:
            destinations, staged = self.optimizer.gradient_buffers(key), []
        else:
            destinations = staged = [self.store.empty(grad.shape, grad.dtype, Tier.CPU) for grad in grads]
        moves = [self.store.copy(buffer, grad) for buffer, grad in zip(destinations, grads)]
        norms = None
        if first and last:
            # The same fp32 per-part norms the CPU would take from the accumulator, which equals `grads`.
            norms_on_device = torch.stack([torch.linalg.vector_norm(grad) for grad in grads])
            norms = self.store.empty(norms_on_device.shape, norms_on_device.dtype, Tier.CPU)
            moves.append(self.store.copy(norms, norms_on_device))
        done = self.optimizer.accumulate(key, staged or None, gather(moves), last=last, norms=norms)
        to_free = staged + ([norms] if norms is not None else [])
        if to_free:
            done.add_done_callback(lambda _: [self.store.free(buffer) for buffer in to_free])

    def offload_outer_grads(self, parameters: list[torch.nn.Parameter]) -> None:
        """The resident parameters' step gradient (accumulated in .grad) to the CPU; clears .grad."""
        decayed = [p for p in parameters if p.ndim >= 2]
        exempt = [p for p in parameters if p.ndim < 2]
        grads = [torch.cat([p.grad.reshape(-1) for p in group]) for group in (decayed, exempt)]
        for p in parameters:
            p.grad = None
        self.offload_grads("outer", grads, first=True, last=True)


def check_fuyou_memory(num_parameters: int, placement: Placement, ssd_dir: str | None) -> None:
    """Refuses a placement whose CPU-side or SSD-side states cannot fit at all (before activations).

    Per parameter: the step's fp32 gradient accumulator (4 B) is always in CPU RAM; master weight and
    moments are 12 B on the optimizer's tier; the streamed weights up to 4 B on the params tier.

    Raises:
        FuyouError: not enough free RAM or disk, with the placement change that would help.
    """
    import psutil

    cpu_bytes = 4 * num_parameters
    ssd_bytes = 0
    for tier, bytes_per_param in ((placement.optimizer, 12), (placement.params, 4)):
        if tier == "cpu":
            cpu_bytes += bytes_per_param * num_parameters
        elif tier == "ssd":
            ssd_bytes += bytes_per_param * num_parameters
    free_cpu_bytes = psutil.virtual_memory().available
    if cpu_bytes > free_cpu_bytes:
        raise FuyouError(
            f"runtime=fuyou with offload.params={placement.params} offload.optimizer={placement.optimizer} needs about "
            f"{cpu_bytes / 1e9:.1f} GB of CPU memory for {num_parameters / 1e9:.2f}B parameters, {free_cpu_bytes / 1e9:.1f} GB free; "
            f"set offload.optimizer=ssd (and offload.params=ssd) or pick a smaller model"
        )
    if ssd_bytes:
        directory = ssd_dir or tempfile.gettempdir()
        free_ssd_bytes = shutil.disk_usage(directory).free if os.path.isdir(directory) else 0
        if ssd_bytes * 1.25 > free_ssd_bytes:
            raise FuyouError(
                f"runtime=fuyou needs about {ssd_bytes * 1.25 / 1e9:.1f} GB of swap space under {directory}, "
                f"{free_ssd_bytes / 1e9:.1f} GB free; point offload.ssd_dir at a larger (existing) directory"
            )


class FuyouRuntime:
    """Trains `model` with its states placed across GPU, CPU and SSD; `step()` like ReferenceTrainer.

    Args:
        model: a `fuyou.models.Transformer` with fp32 parameters on the CPU. The runtime takes it over:
            the outer parameters move to `device`, the blocks' storage is released (blocks become
            templates on "meta") until `sync_model()` writes the trained weights back.
        device: the compute device ("cuda" or "cpu").
        lr, warmup_steps, total_steps, min_lr_ratio, weight_decay, betas, eps, max_grad_norm, precision:
            as `ReferenceTrainer`.
        params, optimizer, activations: the placement (see module docstring).
        gpu_memory_gb, cpu_memory_gb: caps on GPU memory and the pinned CPU pool (None: no cap).
        ssd_dir: directory for the swap file; None: a temporary directory, removed by `close()`.
        prefetch_depth: blocks fetched ahead of compute.
        micro_batch_tokens: B x S of one micro-batch, to size the SSD swap file for activations.
        optimizer_kernel: "torch" (fused CPU AdamW) or "deepspeed" (DeepSpeedCPUAdam).

    Raises:
        ConfigError: an invalid placement.
        OffloadError: a cap too small for the placement, or no room for the swap file.
    """

    def __init__(self, model, *, device: str | torch.device = "cpu", lr: float, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.1, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, max_grad_norm: float | None = None, precision: str = "fp32",
                 params: str = "cpu", optimizer: str = "cpu", activations: str = "cpu",
                 gpu_memory_gb: float | None = None, cpu_memory_gb: float | None = None, ssd_dir: str | None = None,
                 prefetch_depth: int = 1, micro_batch_tokens: int = 0, optimizer_kernel: str = "torch") -> None:
        assert precision in ("fp32", "bf16"), precision
        self.placement = Placement(params, optimizer, activations)
        self.device = torch.device(device)
        self.model = model
        self.schedule_args = dict(peak_lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
        self.max_grad_norm = max_grad_norm
        self.step_index = 0
        # The first step defers (as if the last one clipped): with no history the gamble is worst, and a
        # fresh model's first norms are the largest; a fix-up over every parameter costs several plain
        # updates (15 s against ~1 s for AdamW on 2.7B on the H100 host), so speculation starts only
        # after a step that did not clip.
        self._clipped_last_step = True
        self._final_stats: dict | None = None
        self.update_modes: list[str] = []  # per step: "speculated", "fixed up" or "deferred" (fuyou.schedule)
        is_cuda = self.device.type == "cuda"
        compute_tier = Tier.GPU if is_cuda else Tier.CPU
        block_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        dtypes = [block_dtype, torch.float32]

        named_blocks = [list(block.named_parameters()) for block in model.blocks]
        layouts = [split_parts(named) for named in named_blocks]
        outer_named = [(n, p) for n, p in model.named_parameters() if not n.startswith("blocks.")]
        outer_layout = split_parts(outer_named)

        self._owned_ssd_dir = None
        if self.placement.uses_ssd and ssd_dir is None:
            ssd_dir = self._owned_ssd_dir = tempfile.mkdtemp(prefix="fuyou-swap-")
        ssd_num_bytes = self._ssd_bytes(layouts, outer_layout, block_dtype, micro_batch_tokens * model.config.hidden_size)
        self.store = TieredStore(
            ssd_dir=ssd_dir if self.placement.uses_ssd else None,
            ssd_num_bytes=ssd_num_bytes,
            cpu_cap_bytes=None if cpu_memory_gb is None else int(cpu_memory_gb * GiB),
            gpu_cap_bytes=None if gpu_memory_gb is None or not is_cuda else int(gpu_memory_gb * GiB),
            device=self.device if is_cuda else None,
        )
        try:
            self.optimizer = OffloadedAdamW(self.store, self.placement.optimizer, betas=betas, eps=eps, kernel=optimizer_kernel)
            params_tier = compute_tier if self.placement.params == "gpu" else Tier(self.placement.params)
            self.weights = BlockWeights(self.store, self.optimizer, layouts, dtypes, params_tier, compute_tier)
            decays = [weight_decay, 0.0]
            for j, named in enumerate(named_blocks):
                masters = [layout.flatten([dict(named)[n] for n in layout.names], torch.float32) for layout in layouts[j]]
                self.weights.put(j, masters)
                self.optimizer.add_group(f"block.{j}", masters, decays, lambda m, j=j: self.weights.publish(j, m))
            self._make_outer_resident(outer_named, outer_layout)
            self.optimizer.add_group("outer", self._outer_flat, decays, self._publish_outer)
        except BaseException:
            self.close()
            raise
        # The blocks' own storage is no longer needed: the store holds every copy the step reads.
        model.blocks.to("meta")

        activation_tier = "cpu" if activations in ("gpu", "none") else activations
        self.schedule = FuyouSchedule(
            model, self.weights, self.optimizer,
            lambda: ActivationSwap(self.store, activation_tier, compute_tier, keep=activations in ("gpu", "none")),
            recompute_inputs=activations == "none", device=self.device, bf16=precision == "bf16", prefetch_depth=prefetch_depth,
        )

    def _ssd_bytes(self, layouts, outer_layout, block_dtype, activation_numel: int) -> int:
        placement, total = self.placement, 0
        for parts in layouts + [outer_layout]:
            for part, layout in enumerate(parts):
                if placement.optimizer == "ssd":
                    total += round_up(3 * 4 * max(layout.numel, 1))
                if placement.params == "ssd" and parts is not outer_layout:
                    total += round_up((block_dtype.itemsize if part == 0 else 4) * max(layout.numel, 1))
        if placement.activations == "ssd":
            total += len(layouts) * round_up(4 * max(activation_numel, 1))
        # Headroom for the swap file's allocator: extents freed and reallocated in a different order.
        return int(total * 1.25) + (16 << 20) if placement.uses_ssd else 0

    def _make_outer_resident(self, outer_named, outer_layout) -> None:
        """Embedding, final norm, head: fp32 on the compute device, as views of two flat buffers."""
        self._outer_flat = []
        for layout in outer_layout:
            flat = layout.flatten([p for n, p in outer_named if n in layout.names], torch.float32).to(self.device)
            for name, view in layout.views(flat).items():
                module_name, _, attribute = name.rpartition(".")
                getattr(self.model.get_submodule(module_name), attribute).data = view
            self._outer_flat.append(flat)

    def _publish_outer(self, masters: list[torch.Tensor]) -> Future:
        return gather([self.store.copy(flat, master) for flat, master in zip(self._outer_flat, masters)])

    def step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """One optimizer step over `micro_batches` (gradient accumulation = len(micro_batches)).

        Returns once the loss and gradient norm are known; updates that are still running finish
        before the next step (or `sync_model()`) reads the weights they write.
        """
        self.model.train()
        lr = lr_at_step(self.step_index, **self.schedule_args)
        speculate = self.max_grad_norm is None or not self._clipped_last_step
        loss_sum, grad_norm, clip = self.schedule.step(micro_batches, lr=lr, max_grad_norm=self.max_grad_norm, speculate=speculate)
        self._clipped_last_step = clip < 1.0
        self.update_modes.append(("speculated" if clip == 1.0 else "fixed up") if speculate else "deferred")
        self.step_index += 1
        num_target_tokens = sum(batch.num_target_tokens for batch in micro_batches)
        return StepResult(
            loss=loss_sum / max(1, num_target_tokens),
            grad_norm=grad_norm,
            lr=lr,
            num_tokens=sum(batch.input_ids.numel() for batch in micro_batches),
            num_target_tokens=num_target_tokens,
        )

    def sync_model(self) -> None:
        """Write the trained fp32 weights into `model` (blocks back on the CPU) after pending updates."""
        self.optimizer.ready("outer").result()
        for j, block in enumerate(self.model.blocks):
            if block.attn_norm.weight.is_meta:
                block.to_empty(device="cpu")
            masters = self.optimizer.masters(f"block.{j}")
            named = dict(block.named_parameters())
            with torch.no_grad():
                for layout, master in zip(self.weights.layouts[j], masters):
                    for name, view in layout.views(master).items():
                        named[name].copy_(view)

    def stats(self) -> dict:
        """Where the step's time and memory went: CPU optimizer worker seconds, update modes, tier peaks."""
        if self._final_stats is not None:
            return self._final_stats
        modes = {mode: self.update_modes.count(mode) for mode in sorted(set(self.update_modes))}
        return {"optimizer_busy_s": dict(self.optimizer.busy_s), "update_modes": modes, "store": self.store.report()}

    def close(self) -> None:
        """Stop the optimizer, free every tier, remove the swap file (and its temporary directory)."""
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.close()
            self._final_stats = self.stats()
        if getattr(self, "store", None) is not None:
            self.store.close()
        if self._owned_ssd_dir is not None:
            shutil.rmtree(self._owned_ssd_dir, ignore_errors=True)
            self._owned_ssd_dir = None
