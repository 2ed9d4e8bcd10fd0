"""`FuyouRuntime`: full fine-tuning with weights, optimizer state and activations placed across GPU/CPU/SSD.

It exposes `step(micro_batches) -> StepResult` like `fuyou.reference.ReferenceTrainer`, and must give
the same losses (tests/test_runtime_parity.py). The step itself is `fuyou.schedule`; this module
builds what the schedule streams: the placement, the tiered store, the flat per-block weights and the
CPU optimizer.

Placement (`Placement`): each state class on "gpu", "cpu" or "ssd".
    params       the compute-precision copy of each block's weights that forward and backward stream
                 ("gpu": resident on the compute device, no streaming). On a machine without CUDA the
                 compute device is the CPU, and "gpu" means "on the compute device". "master": no such
                 copy; each fetch streams the block's fp32 master weights from the optimizer state in CPU
                 RAM and the compute device casts them (needs optimizer "cpu"). Against "cpu" it moves 4
                 instead of 2 bytes per weight over PCIe in bf16, and saves the cast pass the CPU makes
                 after every update (a third of the CPU optimizer's time on the H100 host) and the 2
                 bytes per weight of the bf16 copy in RAM; in fp32 it moves the same bytes and saves 4.
    optimizer    fp32 master weights and AdamW moments; "cpu" or "ssd" (the optimizer runs on the CPU).
                 With "ssd", `optimizer_cpu_blocks` = k splits it per group: blocks 0..k-1 and the outer
                 group keep their state in CPU RAM, blocks k..L-1 on the SSD (None: every group on SSD).
    activations  each block's checkpointed input between forward and backward: "gpu" kept on the
                 compute device, "cpu"/"ssd" swapped out and back ahead of backward, "none" nothing
                 kept but the embedding output (x_0): backward recomputes every block input from it.
    outer_optimizer  where the outer group (embeddings, final norm, LM head; resident on the compute
                 device in fp32) keeps its AdamW moments and is updated: "cpu" with the blocks (the
                 CPU optimizer, on `optimizer`'s tier), or "gpu" beside its weights on the compute
                 device (offload.resident_optimizer: no gradient out, update and weights back in as
                 the serial tail of every step, for 8 B/param of GPU memory).

State layout (what a checkpoint must hold; SIGKILL-safe resume is a later issue). Groups are "outer"
(embedding, position embedding, final norm, LM head: every parameter outside `blocks`) and
"block.{j}" for j in 0..L-1. Each group is two flat "parts", in `named_parameters()` order:
    part 0  parameters with ndim >= 2 (weight decay applies)
    part 1  parameters with ndim < 2 (norm scales, biases: no decay)
(`FlatLayout` gives names, shapes and offsets.) In the store:
    optim.{group}.{part}         fp32 [3, n]: master weight, exp_avg, exp_avg_sq, on the group's
                                 optimizer tier: `optimizer_tier(group)`, CPU or SSD per group
                                 (with outer_optimizer "gpu", the outer group's moments are
                                 `FuyouRuntime.resident_outer.moments`, fp32 [2, n] on the device,
                                 and its masters the resident weights)
    param.block.{j}.{part}       part 0 in the compute dtype (bf16 or fp32), part 1 fp32, [n]
                                 (params tier; derived from the master, need not be saved; none with
                                 params "master")
    the outer group's weights    fp32 on the compute device (the model's own parameters)
    Adam step count              per group (`OffloadedAdamW.groups[g].step`, `ResidentAdamW.step_count`),
                                 equal at step boundaries
    step index                   `FuyouRuntime.step_index` (drives the LR schedule)
A checkpoint is therefore: the masters and moments of every (group, part), the step count and the
step index; the data position and RNG belong to the trainer.

Not state (rebuilt every step): the fp32 gradient of each (group, part), in pinned CPU memory; a
full-size accumulator per group, or, with `gradient_ring` = n, n group-sized buffers shared by all
groups (see offload.cpu_optimizer.GradientRing).

Memory (`memory_need`): what each tier must hold for a placement, computed from the model's shapes
alone (a model on "meta" will do); the trainer checks it before building anything and the runtime
sizes its swap file from it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fuyou.data import Batch
from fuyou.errors import ConfigError, FuyouError
from fuyou.lr_schedule import lr_at_step
from fuyou.reference import StepResult
from fuyou.schedule import FuyouSchedule
from offload import GiB, TieredStore
from offload.activations import ActivationSwap
from offload.cpu_optimizer import AdamWKernel, OffloadedAdamW
from offload.futures import completed, gather, then
from offload.pinned import round_up
from offload.resident_optimizer import ResidentAdamW
from offload.store import Tier

STATE_PLACEMENTS = ("gpu", "cpu", "ssd")
PARAM_PLACEMENTS = (*STATE_PLACEMENTS, "master")
ACTIVATION_PLACEMENTS = ("gpu", "cpu", "ssd", "none")
OUTER_OPTIMIZER_PLACEMENTS = ("cpu", "gpu")


@dataclass(frozen=True)
class Placement:
    """Where each state class lives (module docstring). Defaults until the planner (issue 5) exists."""

    params: str = "cpu"
    optimizer: str = "cpu"
    activations: str = "cpu"
    optimizer_cpu_blocks: int | None = None
    outer_optimizer: str = "cpu"

    def __post_init__(self) -> None:
        if self.params not in PARAM_PLACEMENTS:
            raise ConfigError(f"offload.params must be one of {', '.join(PARAM_PLACEMENTS)}; got {self.params!r}")
        if self.optimizer not in ("cpu", "ssd"):
            raise ConfigError(f"offload.optimizer={self.optimizer!r}: the Fuyou optimizer runs on the CPU, so its state lives on cpu or ssd")
        if self.params == "master" and self.optimizer != "cpu":
            raise ConfigError(
                "offload.params=master streams each block from its fp32 master weights in CPU RAM, but "
                f"offload.optimizer={self.optimizer} keeps them on the SSD; set offload.optimizer=cpu or offload.params=cpu"
            )
        if self.activations not in ACTIVATION_PLACEMENTS:
            raise ConfigError(f"offload.activations must be one of {', '.join(ACTIVATION_PLACEMENTS)}; got {self.activations!r}")
        if self.outer_optimizer not in OUTER_OPTIMIZER_PLACEMENTS:
            raise ConfigError(f"offload.outer_optimizer must be one of {', '.join(OUTER_OPTIMIZER_PLACEMENTS)}; got {self.outer_optimizer!r}")
        if self.optimizer_cpu_blocks is not None:
            if self.optimizer != "ssd":
                raise ConfigError(
                    "offload.optimizer_cpu_blocks splits the optimizer state between CPU RAM and the SSD; "
                    "set offload.optimizer=ssd with it, or drop it to keep every group's state in RAM"
                )
            if self.optimizer_cpu_blocks < 0:
                raise ConfigError(f"offload.optimizer_cpu_blocks must be >= 0 or null, got {self.optimizer_cpu_blocks}")

    @property
    def uses_ssd(self) -> bool:
        return "ssd" in (self.params, self.optimizer, self.activations)

    def optimizer_tier(self, group: str) -> str:
        """Where group "outer" or "block.{j}" keeps its fp32 masters and moments: "cpu" or "ssd".

        (The outer group's with outer_optimizer "gpu" is on the compute device instead.)
        With a split (`optimizer_cpu_blocks` = k) the outer group and blocks 0..k-1 stay in RAM and
        blocks k..L-1 go to the SSD. Why those: backward updates blocks L-1 down to 0, then the outer
        group, and the next step's forward needs the outer group and block 0 first. With the SSD
        blocks on top, the disk starts streaming at the first block of backward (its read even
        starts during forward: the outer group's update reads block L-1's state ahead) and the last
        updates before the next forward are the fast RAM ones, so that forward waits for no disk.
        The other way round, the last SSD update (block 0) would sit between backward and the next
        forward every step. The outer group also stays in RAM because it is updated last and read first.
        """
        if self.optimizer == "cpu" or self.optimizer_cpu_blocks is None:
            return self.optimizer
        if group == "outer":
            return "cpu"
        return "cpu" if int(group.removeprefix("block.")) < self.optimizer_cpu_blocks else "ssd"


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
    """Each block's streamed weights and the gradients' way to the CPU.

    Forward and backward read block j's weights from one of two places:
    - its home `param.block.{j}.{part}` in the compute dtype on `tier`, which `publish` rewrites (cast on
      the CPU) after every update of the block;
    - with `from_masters` (params "master") nothing of its own: `fetch` copies the fp32 master rows of
      the block's optimizer state (CPU RAM) to the compute device and `take` casts them there, on the
      compute stream, so `publish` has nothing to do.
    """

    def __init__(self, store: TieredStore, optimizer: OffloadedAdamW, layouts: list[list[FlatLayout]],
                 dtypes: list[torch.dtype], tier: Tier | None, compute_tier: Tier, *, from_masters: bool = False) -> None:
        assert from_masters == (tier is None), "weights have a home tier unless they stream from the masters"
        self.store, self.optimizer, self.layouts, self.dtypes = store, optimizer, layouts, dtypes
        self.tier, self.compute_tier, self.from_masters = tier, compute_tier, from_masters
        self.resident = tier is compute_tier  # params "gpu": compute reads the home itself

    def name(self, j: int, part: int) -> str:
        return f"param.block.{j}.{part}"

    def put(self, j: int, masters: list[torch.Tensor]) -> None:
        if self.from_masters:
            return
        for part, (master, dtype) in enumerate(zip(masters, self.dtypes)):
            self.store.put(self.name(j, part), master.to(dtype), self.tier).result()

    def publish(self, j: int, masters: list[torch.Tensor]) -> Future:
        """Cast updated fp32 masters (CPU) to the compute dtype and write them to block j's home.

        A home in CPU memory takes the cast directly (one pass over the block, not a cast into a
        staging buffer and a copy); other homes get the cast through a staging buffer and `copy()`.
        Streaming from the masters there is no home: the update itself wrote what `fetch` reads.
        """
        if self.from_masters:
            return completed()
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
        """Block j's parts on the compute device, once its latest update is home (`take` finishes them)."""
        ready = self.optimizer.ready(f"block.{j}")
        parts = range(len(self.dtypes))
        if self.from_masters:
            def copy_masters() -> Future:
                moves = []
                for master in self.optimizer.master_rows(f"block.{j}"):
                    moves.append(self.store.copy(self.store.empty(master.shape, master.dtype, self.compute_tier), master))
                return gather(moves)
            return then(ready, copy_masters)
        if self.resident:
            names = [self.name(j, part) for part in parts]
            return then(ready, lambda: completed([self.store.home(n) for n in names]))
        return then(ready, lambda: gather([self.store.fetch(self.name(j, part), self.compute_tier) for part in parts]))

    def take(self, j: int, fetched: list[torch.Tensor]) -> list[torch.Tensor]:
        """What compute reads from `fetch`'s result: the same parts, or, streamed from the masters, their
        casts to the compute dtypes, issued here on the caller's (compute) stream; the fp32 copies go back."""
        if not self.from_masters:
            return fetched
        parts = []
        for master, dtype in zip(fetched, self.dtypes):
            if master.dtype == dtype:
                parts.append(master)
                continue
            cast = self.store.empty(master.shape, dtype, self.compute_tier)
            cast.copy_(master)
            self.store.free(master)
            parts.append(cast)
        return parts

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

    @staticmethod
    def take_outer_grads(parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """The resident parameters' step gradient (accumulated in .grad) as the outer group's two flat
        parts (`split_parts`: decayed, then not), on the compute device; clears .grad."""
        decayed = [p for p in parameters if p.ndim >= 2]
        exempt = [p for p in parameters if p.ndim < 2]
        grads = [torch.cat([p.grad.reshape(-1) for p in group]) for group in (decayed, exempt)]
        for p in parameters:
            p.grad = None
        return grads

    def offload_outer_grads(self, parameters: list[torch.nn.Parameter]) -> None:
        """The resident parameters' step gradient to the CPU optimizer's "outer" group; clears .grad."""
        self.offload_grads("outer", self.take_outer_grads(parameters), first=True, last=True)


def model_layouts(model) -> tuple[list[list[FlatLayout]], list[FlatLayout]]:
    """Each block's parts and the outer group's parts (`split_parts`); shapes only, so "meta" will do."""
    blocks = [split_parts(list(block.named_parameters())) for block in model.blocks]
    outer = split_parts([(n, p) for n, p in model.named_parameters() if not n.startswith("blocks.")])
    return blocks, outer


STATE_BYTES_PER_PARAM = 12  # fp32 master weight, exp_avg, exp_avg_sq
GRAD_BYTES_PER_PARAM = 4  # fp32 gradient on the CPU
# An SSD group's state passes through pinned CPU memory: the group being updated, the next one read
# ahead and the previous one still being written back (offload.cpu_optimizer).
SSD_GROUPS_IN_FLIGHT = 3
# Host memory outside what `memory_need` counts: the interpreter, torch's libraries and, on a GPU
# machine, the CUDA context and its kernels (a few GB of RSS before any tensor of ours; not measured here).
PROCESS_RESERVE_BYTES = 4 * 10**9


@dataclass(frozen=True)
class MemoryNeed:
    """What a placement holds in CPU memory and in the swap file (GPU memory is priced by fuyou.plan).

    Attributes:
        cpu_bytes: peak CPU memory the runtime allocates (the interpreter's and CUDA's own come on top).
        ssd_bytes: the swap file's size: every SSD home plus the activation extents in flight.
    """

    cpu_bytes: int
    ssd_bytes: int


def memory_need(model, placement: Placement, *, block_dtype: torch.dtype = torch.bfloat16, gradient_ring: int = 0,
                activation_numel: int = 0, built_whole: bool = False) -> MemoryNeed:
    """Bytes per tier for `model` (any device, "meta" too) placed as `placement`.

    CPU: the optimizer state of the groups on "cpu" (12 B/param; the outer group's only with
    outer_optimizer "cpu") and SSD_GROUPS_IN_FLIGHT of the
    largest SSD group's; streamed weights on "cpu" (compute dtype for matrices, fp32 for the rest);
    fp32 gradients (4 B for every parameter, or `gradient_ring` largest-group buffers); activations on
    "cpu" (each block's fp32 input, `activation_numel` = B x S x D elements); and building: one block
    at a time in fp32, flattened and cast, plus the outer group's fp32 weights. `built_whole`: the
    model arrives materialised in fp32 (a checkpoint) and its 4 B/param are released block by block
    as the store fills, so the peak is the larger of that model and the runtime's own need.

    SSD: the homes on "ssd", each padded to 4096 bytes, allocated once and never freed (so the swap
    file's first-fit allocator never fragments them), plus, with activations on "ssd", one micro-batch's
    L block inputs and one more whose extent is still being freed when the next micro-batch saves.
    Those extents are all the same size, so any freed one fits the next: no headroom beyond that.
    """
    layouts, outer_layout = model_layouts(model)
    groups = {f"block.{j}": parts for j, parts in enumerate(layouts)}
    if placement.outer_optimizer == "cpu":  # else its state and gradient stay on the compute device
        groups["outer"] = outer_layout
    cpu_bytes = ssd_bytes = 0
    ssd_group_bytes = [0]
    for key, parts in groups.items():
        state_bytes = sum(round_up(STATE_BYTES_PER_PARAM * max(layout.numel, 1)) for layout in parts)
        if placement.optimizer_tier(key) == "cpu":
            cpu_bytes += state_bytes
        else:
            ssd_bytes += state_bytes
            ssd_group_bytes.append(state_bytes)
    cpu_bytes += SSD_GROUPS_IN_FLIGHT * max(ssd_group_bytes)
    weight_bytes = sum(round_up((block_dtype.itemsize if part == 0 else 4) * max(layout.numel, 1))
                       for parts in layouts for part, layout in enumerate(parts))
    if placement.params == "cpu":  # ("master": no weights beside the optimizer's masters)
        cpu_bytes += weight_bytes
    elif placement.params == "ssd":
        ssd_bytes += weight_bytes
    group_numels = [[layout.numel for layout in parts] for parts in groups.values()]
    if gradient_ring:
        widest = [max(numels[p] for numels in group_numels) for p in range(2)]
        cpu_bytes += gradient_ring * sum(round_up(GRAD_BYTES_PER_PARAM * max(n, 1)) for n in widest)
    else:
        cpu_bytes += sum(round_up(GRAD_BYTES_PER_PARAM * max(n, 1)) for numels in group_numels for n in numels)
    activation_bytes = round_up(4 * max(activation_numel, 1))
    if placement.activations == "cpu":
        cpu_bytes += len(layouts) * activation_bytes
    elif placement.activations == "ssd":
        ssd_bytes += (len(layouts) + 1) * activation_bytes
    block_numel = max((sum(layout.numel for layout in parts) for parts in layouts), default=0)
    outer_numel = sum(layout.numel for layout in outer_layout)
    cpu_bytes += block_numel * (4 + 4 + block_dtype.itemsize) + 4 * outer_numel
    if built_whole:
        cpu_bytes = max(cpu_bytes, 4 * (outer_numel + sum(layout.numel for parts in layouts for layout in parts)))
    return MemoryNeed(cpu_bytes, ssd_bytes)


def check_fuyou_memory(model, placement: Placement, ssd_dir: str | None, **need_args) -> MemoryNeed:
    """Refuses a placement whose CPU-side or SSD-side states cannot fit (`memory_need`; before GPU activations).

    Args:
        model: the model to place; "meta" is enough (only shapes are read).
        placement: the placement asked for.
        ssd_dir: where the swap file would go (None: the temporary directory).
        need_args: `memory_need`'s keyword arguments.

    Returns:
        The need, when it fits.

    Raises:
        FuyouError: one line naming the short resource, by how much, and the placement that fits
            (an `offload.optimizer_cpu_blocks` split of the optimizer state), or that none does.
    """
    import psutil

    directory = ssd_dir or tempfile.gettempdir()
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):  # the swap file creates the directory; its disk is the nearest existing parent's
        existing = os.path.dirname(existing)
    free_cpu_bytes = psutil.virtual_memory().available - PROCESS_RESERVE_BYTES
    free_ssd_bytes = shutil.disk_usage(existing).free
    need = memory_need(model, placement, **need_args)
    if need.cpu_bytes <= free_cpu_bytes and (need.ssd_bytes == 0 or need.ssd_bytes <= free_ssd_bytes):
        return need

    def shortfall(n: MemoryNeed) -> tuple[int, int]:
        return max(0, n.cpu_bytes - free_cpu_bytes), (max(0, n.ssd_bytes - free_ssd_bytes) if n.ssd_bytes else 0)

    num_parameters = sum(p.numel() for p in model.parameters())
    cpu_short, ssd_short = shortfall(need)
    short = " and ".join(text for text, missing in (("RAM", cpu_short), ("disk", ssd_short)) if missing)
    where = (f"runtime=fuyou with offload.params={placement.params} offload.optimizer={placement.optimizer}"
             + (f" offload.optimizer_cpu_blocks={placement.optimizer_cpu_blocks}" if placement.optimizer_cpu_blocks is not None else "")
             + f" needs {need.cpu_bytes / 1e9:.1f} GB of CPU memory ({free_cpu_bytes / 1e9:.1f} GB free beside the process's own "
             + f"{PROCESS_RESERVE_BYTES / 1e9:.0f} GB)"
             + (f" and {need.ssd_bytes / 1e9:.1f} GB of swap under {directory} ({free_ssd_bytes / 1e9:.1f} GB free)" if need.ssd_bytes else "")
             + f" for {num_parameters / 1e9:.2f}B parameters: {short} short by "
             + " and ".join(f"{missing / 1e9:.1f} GB" for missing in (cpu_short, ssd_short) if missing))
    # The fix: split the optimizer state per block between RAM and the SSD, as much in RAM as fits
    # (weights streamed from the masters need them in RAM: those get a copy of their own in RAM).
    params = "cpu" if placement.params == "master" else placement.params
    splits = {k: Placement(params, "ssd", placement.activations, k, placement.outer_optimizer) for k in range(len(model.blocks) + 1)}
    shortfalls = {k: shortfall(memory_need(model, split, **need_args)) for k, split in splits.items()}
    fitting = [k for k, missing in shortfalls.items() if not any(missing)]
    if fitting:
        raise FuyouError(
            f"{where}; set{' offload.params=cpu' if params != placement.params else ''} offload.optimizer=ssd "
            f"offload.optimizer_cpu_blocks={max(fitting)} (blocks whose optimizer state "
            f"stays in RAM; {min(fitting)} to {max(fitting)} fit)"
        )
    best = min(shortfalls, key=lambda k: sum(shortfalls[k]))
    cpu_short, ssd_short = shortfalls[best]
    raise FuyouError(
        f"{where}; no split of the optimizer state fits either: the closest, offload.optimizer=ssd "
        f"offload.optimizer_cpu_blocks={best}, is still short by {cpu_short / 1e9:.1f} GB of RAM and {ssd_short / 1e9:.1f} GB "
        f"of disk; pick a smaller model, free disk under {directory}, or use a machine with more memory"
    )


class FuyouRuntime:
    """Trains `model` with its states placed across GPU, CPU and SSD; `step()` like ReferenceTrainer.

    Args:
        model: a `fuyou.models.Transformer` with fp32 parameters on the CPU, or on "meta" with an
            `initializer` to build them. The runtime takes it over: the outer parameters move to
            `device`, each block's storage is released (blocks become templates on "meta") as soon
            as the store holds its copies, until `sync_model()` writes the trained weights back.
        device: the compute device ("cuda" or "cpu").
        lr, warmup_steps, total_steps, min_lr_ratio, weight_decay, betas, eps, max_grad_norm, precision:
            as `ReferenceTrainer`.
        params, optimizer, activations, optimizer_cpu_blocks, outer_optimizer: the placement (see module docstring).
        gpu_memory_gb, cpu_memory_gb: caps on GPU memory and the pinned CPU pool (None: no cap).
        ssd_dir: directory for the swap file; None: a temporary directory, removed by `close()`.
        prefetch_depth: blocks fetched ahead of compute.
        micro_batch_tokens: B x S of one micro-batch, to size the SSD swap file for activations.
        optimizer_kernel: "torch" (fused CPU AdamW) or "deepspeed" (DeepSpeedCPUAdam).
        gradient_ring: 0: a full-size fp32 gradient accumulator per group; n > 0: n group-sized
            buffers shared by all groups, taken as gradients leave the device and returned after each
            group's update (offload.cpu_optimizer.GradientRing). Only for steps of one micro-batch
            without clipping (`max_grad_norm` None): a clipping fix-up, a deferred update or the next
            micro-batch would need a gradient after its group's update.
        initializer: a `fuyou.models.Initializer` for a model on "meta": its pieces are materialised
            and initialised on the CPU one at a time, in its order, each block released to "meta"
            again once flattened into the store, so the whole model never exists in fp32 at once.
        compile_blocks: run each block through one torch.compile'd function (train.compile;
            fuyou.block_compile).

    Raises:
        ConfigError: an invalid placement, or a gradient ring with clipping.
        OffloadError: a cap too small for the placement, or no room for the swap file.
    """

    def __init__(self, model, *, device: str | torch.device = "cpu", lr: float, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.1, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, max_grad_norm: float | None = None, precision: str = "fp32",
                 params: str = "cpu", optimizer: str = "cpu", activations: str = "cpu", optimizer_cpu_blocks: int | None = None,
                 outer_optimizer: str = "cpu",
                 gpu_memory_gb: float | None = None, cpu_memory_gb: float | None = None, ssd_dir: str | None = None,
                 prefetch_depth: int = 1, micro_batch_tokens: int = 0, optimizer_kernel: str = "torch",
                 gradient_ring: int = 0, initializer: Callable | None = None, compile_blocks: bool = False) -> None:
        assert precision in ("fp32", "bf16"), precision
        self.placement = Placement(params, optimizer, activations, optimizer_cpu_blocks, outer_optimizer)
        num_layers = len(model.blocks)
        if optimizer_cpu_blocks is not None and optimizer_cpu_blocks > num_layers:
            raise ConfigError(f"offload.optimizer_cpu_blocks={optimizer_cpu_blocks} but the model has {num_layers} blocks; use 0 to {num_layers}")
        if gradient_ring and max_grad_norm is not None:
            raise ConfigError(
                "a gradient ring returns each group's gradient after its update, but clipping may need it again "
                "(fix-up or deferred update); set train.max_grad_norm=null or use full-size gradient buffers"
            )
        self.gradient_ring = gradient_ring
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
        layouts, outer_layout = model_layouts(model)  # shapes: valid on "meta" too

        self._owned_ssd_dir = None
        if self.placement.uses_ssd and ssd_dir is None:
            ssd_dir = self._owned_ssd_dir = tempfile.mkdtemp(prefix="fuyou-swap-")
        need = memory_need(model, self.placement, block_dtype=block_dtype, gradient_ring=gradient_ring,
                           activation_numel=micro_batch_tokens * model.config.hidden_size)
        self.store = TieredStore(
            ssd_dir=ssd_dir if self.placement.uses_ssd else None,
            ssd_num_bytes=need.ssd_bytes,
            cpu_cap_bytes=None if cpu_memory_gb is None else int(cpu_memory_gb * GiB),
            gpu_cap_bytes=None if gpu_memory_gb is None or not is_cuda else int(gpu_memory_gb * GiB),
            device=self.device if is_cuda else None,
        )
        try:
            self.optimizer = OffloadedAdamW(self.store, self.placement.optimizer, betas=betas, eps=eps, kernel=optimizer_kernel,
                                            gradient_ring=gradient_ring)
            from_masters = self.placement.params == "master"
            params_tier = None if from_masters else compute_tier if self.placement.params == "gpu" else Tier(self.placement.params)
            self.weights = BlockWeights(self.store, self.optimizer, layouts, dtypes, params_tier, compute_tier,
                                        from_masters=from_masters)
            decays = [weight_decay, 0.0]
            block_index = {id(block): j for j, block in enumerate(model.blocks)}
            # Pieces in the initializer's order (its generator's draws follow it): embeddings, blocks, head.
            for piece in initializer.pieces() if initializer is not None else list(model.blocks):
                if initializer is not None:
                    initializer.materialize(piece)
                if id(piece) not in block_index:
                    continue  # an outer piece: made resident below, with the rest of the outer group
                j = block_index[id(piece)]
                named = dict(piece.named_parameters())
                masters = [layout.flatten([named[n] for n in layout.names], torch.float32) for layout in layouts[j]]
                del named
                self.weights.put(j, masters)
                key = f"block.{j}"
                self.optimizer.add_group(key, masters, decays, lambda m, j=j: self.weights.publish(j, m),
                                         tier=self.placement.optimizer_tier(key))
                del masters
                # The block's own storage is no longer needed: the store holds every copy the step reads.
                piece.to("meta")
            outer_named = [(n, p) for n, p in model.named_parameters() if not n.startswith("blocks.")]
            self._make_outer_resident(outer_named, outer_layout)
            self.resident_outer = None
            if outer_optimizer == "gpu":
                # torch's fused AdamW: it runs on the device (DeepSpeed's kernel is CPU-only)
                self.resident_outer = ResidentAdamW(self.store, self._outer_flat, decays, compute_tier,
                                                    AdamWKernel("torch", betas=betas, eps=eps))
            else:
                self.optimizer.add_group("outer", self._outer_flat, decays, self._publish_outer,
                                         tier=self.placement.optimizer_tier("outer"))
        except BaseException:
            self.close()
            raise

        activation_tier = "cpu" if activations in ("gpu", "none") else activations
        self.schedule = FuyouSchedule(
            model, self.weights, self.optimizer,
            lambda: ActivationSwap(self.store, activation_tier, compute_tier, keep=activations in ("gpu", "none")),
            recompute_inputs=activations == "none", device=self.device, bf16=precision == "bf16", prefetch_depth=prefetch_depth,
            compile_blocks=compile_blocks, resident_outer=self.resident_outer,
        )

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
        if self.gradient_ring and len(micro_batches) != 1:
            raise ConfigError(
                f"a gradient ring holds one micro-batch's gradient per group, but this step has {len(micro_batches)}; "
                "set train.grad_accum=1 or use full-size gradient buffers (gradient_ring=0)"
            )
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
        if self.resident_outer is None:
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
