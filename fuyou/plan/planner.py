"""The planner: picks the Plan with the best predicted throughput that fits the memory caps, or says which
resource is short and by how much.

Search (exhaustive over a small space, every candidate priced by `cost_model.predict`):
    params       gpu, cpu, ssd, master  (unless the config fixes it; master only with optimizer cpu)
    optimizer    cpu, ssd; for ssd both all on the SSD and the split (`Plan.optimizer_cpu_blocks` = K:
                 blocks 0..K-1 and the outer group in RAM) with the largest K < L that fits: every block
                 more in RAM only removes SSD traffic, so that split is the fastest (K = L is optimizer cpu)
    activations  gpu, cpu, ssd          ("none", quadratic recompute, only when the config asks for it)
    micro-batch  every divisor of the step's batch (the rest is gradient accumulation)
    depth        2, else 1              (the cost model credits no time to depth > 1, so the deeper prefetch
                                         that fits is taken: it absorbs jitter the model does not see)
    internals    with `swap_internals` (Fuyou's activation swapping, paper section 4.4): block halves
                 ranked by recompute FLOPs saved per byte moved, added greedily while the predicted
                 iteration time falls (the paper shows it convex in the swapped amount).
With `search_batch`, the step's batch is searched too: powers of two up to the given batch, the best
tokens/s winning (the smaller batch when within 1%).
Ties within 0.5% go to less SSD, then fewer micro-batches, then less CPU and less GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuyou.errors import FuyouError
from fuyou.models import TransformerConfig
from fuyou.plan import cost_model
from fuyou.plan.cost_model import GiB, Prediction, predict
from fuyou.plan.hardware import HardwareProfile
from fuyou.plan.policy import Plan

NEAR_BEST = 1.005  # plans within 0.5% of the best time per token count as ties
BATCH_TIE = 1.01


class PlanError(FuyouError):
    """No plan fits: the message names the short resource and by how much."""


@dataclass(frozen=True)
class Caps:
    """Memory available to the run, bytes (None: not checked)."""

    gpu_bytes: int
    cpu_bytes: int
    ssd_bytes: int | None
    shared_ram: bool = False  # compute device is the CPU: "GPU" and CPU tiers share the same RAM

    @classmethod
    def of(cls, hardware: HardwareProfile, gpu_memory_gb: float | None = None, cpu_memory_gb: float | None = None) -> Caps:
        """The hardware's capacities, lowered by the config's caps (`offload.gpu_memory_gb`, GiB) where set."""
        gpu = hardware.gpu_memory_gb if gpu_memory_gb is None else min(gpu_memory_gb, hardware.gpu_memory_gb)
        cpu = hardware.cpu_memory_gb if cpu_memory_gb is None else min(cpu_memory_gb, hardware.cpu_memory_gb)
        if hardware.ssd_count == 0:
            ssd = 0
        else:
            ssd = None if hardware.ssd_capacity_gb is None else int(hardware.ssd_capacity_gb * GiB)
        return cls(int(gpu * GiB), int(cpu * GiB), ssd, shared_ram=hardware.compute_device == "cpu")


@dataclass(frozen=True)
class Shortfall:
    resource: str  # "GPU memory", "CPU memory", "RAM", "SSD space"
    need_bytes: int
    have_bytes: int

    @property
    def short_bytes(self) -> int:
        return self.need_bytes - self.have_bytes

    @property
    def fraction(self) -> float:
        return self.short_bytes / max(self.have_bytes, 1)


FIXES = {
    "GPU memory": "lower train.batch_size or train.seq_len, or raise offload.gpu_memory_gb",
    "CPU memory": "move offload.optimizer / offload.params / offload.activations to ssd (or lower offload.optimizer_cpu_blocks), "
                  "or raise offload.cpu_memory_gb",
    "RAM": "lower train.batch_size or train.seq_len, or use a machine with more memory",
    "SSD space": "free space on the SSDs (ssd_capacity_gb in the hardware profile) or keep more on the CPU "
                 "(a higher offload.optimizer_cpu_blocks)",
}


def _fix(model: TransformerConfig, plan: Plan, short: Shortfall, gradient_ring: int) -> str:
    if short.resource == "CPU memory" and plan.params == "ssd" and plan.optimizer_tier(None) == "ssd":
        if gradient_ring:
            return "everything already streams from the SSDs: add RAM or pick a smaller model"
        accumulator = cost_model.GRAD_ACCUMULATOR_BYTES_PER_PARAM * model.num_parameters() / GiB
        return (f"everything already streams from the SSDs, and the runtime's fp32 gradient sum alone takes "
                f"{accumulator:.0f} GiB of RAM: add RAM, pick a smaller model, or take one micro-batch a step "
                f"without clipping (train.grad_accum=1 train.max_grad_norm=null: gradients go through offload.gradient_ring)")
    return FIXES[short.resource]


def shortfalls(memory: tuple[int, int, int], caps: Caps) -> list[Shortfall]:
    """Every cap that `memory` = (GPU, CPU, SSD) bytes exceeds."""
    gpu, cpu, ssd = memory
    found = []
    if caps.shared_ram:
        if gpu + cpu > caps.cpu_bytes:
            found.append(Shortfall("RAM", gpu + cpu, caps.cpu_bytes))
    else:
        if gpu > caps.gpu_bytes:
            found.append(Shortfall("GPU memory", gpu, caps.gpu_bytes))
        if cpu > caps.cpu_bytes:
            found.append(Shortfall("CPU memory", cpu, caps.cpu_bytes))
    if caps.ssd_bytes is not None and ssd > caps.ssd_bytes:
        found.append(Shortfall("SSD space", ssd, caps.ssd_bytes))
    return found


def memory_of(model: TransformerConfig, plan: Plan, hardware: HardwareProfile, gradient_ring: int = 0) -> tuple[int, int, int]:
    return cost_model.peak_memory(model, plan, cost_model.sizes(model, plan), cost_model.reserved_bytes(hardware),
                                  gradient_ring=gradient_ring)


def choose_plan(
    model: TransformerConfig,
    hardware: HardwareProfile,
    *,
    batch_size: int,
    seq_len: int,
    gpu_memory_gb: float | None = None,
    cpu_memory_gb: float | None = None,
    params: str | None = None,
    optimizer: str | None = None,
    activations: str | None = None,
    micro_batch_size: int | None = None,
    prefetch_depth: int | None = None,
    optimizer_cpu_blocks: int | None = None,
    precision: str = "bf16",
    swap_internals: bool = False,
    recompute_last_linear: bool = False,
    outer_optimizer: str = "cpu",
    split_optimizer: bool = True,
    search_batch: bool = False,
    gradient_ring: int = 0,
    clipping: bool = True,
) -> Prediction:
    """The fastest plan (tokens/s) that fits, with its prediction.

    Args:
        model: the shape (only its numbers are used; nothing is allocated).
        hardware: rates and capacities.
        batch_size: sequences per optimizer step (with `search_batch`: the largest to consider).
        seq_len: tokens per sequence.
        gpu_memory_gb, cpu_memory_gb: the config's caps, GiB (None: the hardware's).
        params, optimizer, activations, micro_batch_size, prefetch_depth: fixed by the user, or None to choose.
        optimizer_cpu_blocks: a split of the optimizer state fixed by the user (implies optimizer "ssd"),
            or None to choose one.
        precision: "bf16" or "fp32".
        swap_internals: also swap block internals (Fuyou's policy; the runtime does not do this yet).
        recompute_last_linear: price whole-block recompute (other systems; `Plan.recompute_last_linear`).
        outer_optimizer: the config's offload.outer_optimizer (not searched: it trades GPU memory for
            the step's serial tail, and the config says which).
        split_optimizer: with optimizer "ssd" and no split given, also price splits of the state between
            RAM and the SSD; False keeps all of it on the SSD (as Fuyou runs it).
        search_batch: choose the step's batch too (powers of two up to `batch_size`).
        gradient_ring, clipping: the config's offload.gradient_ring and whether train.max_grad_norm clips;
            a candidate of one micro-batch without clipping rings its gradients (`gradient_ring_buffers`).

    Raises:
        PlanError: nothing fits; one line naming the short resource, by how much, and a fix.
    """
    caps = Caps.of(hardware, gpu_memory_gb, cpu_memory_gb)
    if optimizer_cpu_blocks is not None:
        if optimizer not in (None, "ssd"):
            raise PlanError(f"optimizer_cpu_blocks={optimizer_cpu_blocks} splits the optimizer state between RAM and the SSD; "
                            f"it needs optimizer ssd, got {optimizer}")
        if not 0 <= optimizer_cpu_blocks <= model.num_layers:
            raise PlanError(f"optimizer_cpu_blocks={optimizer_cpu_blocks} but the model has {model.num_layers} blocks; "
                            f"use 0 to {model.num_layers}")
        optimizer = "ssd"
    if params == "master" and optimizer not in (None, "cpu"):
        raise PlanError(f"params master streams the fp32 masters from CPU RAM; it needs optimizer cpu, got {optimizer}")
    batches = _powers_of_two(batch_size) if search_batch else [batch_size]
    # the cost model credits no time to prefetch depth > 1, so the deepest that fits (up to 2) is taken
    depths = [prefetch_depth] if prefetch_depth is not None else [2, 1]
    best_per_batch: list[Prediction] = []
    leanest: tuple[int, list[Shortfall], Plan, int] | None = None
    for batch in batches:
        candidates = []
        for base in _candidates(batch, seq_len, params, optimizer, activations, micro_batch_size, precision,
                                optimizer_cpu_blocks, recompute_last_linear, outer_optimizer):
            ring = cost_model.gradient_ring_buffers(gradient_ring, base.grad_accum, clipping)
            fitting: list[Plan] = []
            for depth in depths:
                # each group of alternatives is tried in order, the first that fits taken: all on the SSD;
                # then the split with the most blocks in RAM that fits
                for alternatives in _optimizer_splits(base.replace(prefetch_depth=depth), model.num_layers,
                                                      fixed=optimizer_cpu_blocks is not None or not split_optimizer):
                    for plan in alternatives:
                        short = shortfalls(memory_of(model, plan, hardware, ring), caps)
                        if not short:
                            fitting.append(plan)
                            break
                        total_short = sum(s.short_bytes for s in short)
                        # The report names one plan's shortfall: params "master" (fp32 blocks in flight on
                        # the GPU) only when asked for; its "cpu" twin stands for it, with a plainer fix.
                        reportable = plan.params != "master" or params == "master"
                        if reportable and (leanest is None or total_short < leanest[0]):
                            leanest = (total_short, short, plan, ring)
                if fitting:
                    break
            for plan in fitting:
                prediction = predict(model, plan, hardware, gradient_ring=ring)
                if swap_internals:
                    prediction = _add_swapped_internals(model, hardware, caps, prediction, ring)
                candidates.append(prediction)
        if candidates:
            best_per_batch.append(_pick(candidates))
    if not best_per_batch:
        assert leanest is not None
        _, short, plan, ring = leanest
        what = " and ".join(f"{s.resource} short by {s.short_bytes / GiB:.1f} GiB ({s.need_bytes / GiB:.1f} needed, "
                            f"{s.have_bytes / GiB:.1f} available)" for s in short)
        raise PlanError(f"infeasible: {what} with the leanest plan ({plan.describe()}); {_fix(model, plan, short[0], ring)}")
    best_rate = max(p.tokens_per_s for p in best_per_batch)
    # the smallest batch within 1% of the best throughput: a larger batch changes the optimisation for nothing
    return min((p for p in best_per_batch if p.tokens_per_s * BATCH_TIE >= best_rate), key=lambda p: p.plan.batch_size)


def _powers_of_two(limit: int) -> list[int]:
    batches, batch = [], 1
    while batch <= limit:
        batches.append(batch)
        batch *= 2
    return batches


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _candidates(batch, seq_len, params, optimizer, activations, micro_batch_size, precision, optimizer_cpu_blocks,
                recompute_last_linear, outer_optimizer="cpu"):
    for p in [params] if params else ("gpu", "cpu", "ssd", "master"):
        for o in [optimizer] if optimizer else ("cpu", "ssd"):
            if p == "master" and o != "cpu":
                continue  # the masters must be in RAM to stream from them
            for a in [activations] if activations else ("gpu", "cpu", "ssd"):
                for micro in [micro_batch_size] if micro_batch_size else _divisors(batch):
                    if batch % micro == 0:
                        yield Plan(params=p, optimizer=o, activations=a, micro_batch_size=micro,
                                   grad_accum=batch // micro, seq_len=seq_len, precision=precision,
                                   optimizer_cpu_blocks=optimizer_cpu_blocks,
                                   recompute_last_linear=recompute_last_linear, outer_optimizer=outer_optimizer)


def _optimizer_splits(plan: Plan, num_layers: int, fixed: bool) -> list[list[Plan]]:
    """The optimizer placements to try for `plan`, as groups of alternatives in order of preference.

    Optimizer "ssd" without a user's split: every group on the SSD, and separately the splits K = L-1
    down to 0 (the cost model prices more blocks in RAM as never slower, so the largest K that fits is
    the split worth pricing; CPU memory grows with K, SSD space shrinks). K = L is optimizer "cpu".
    """
    if plan.optimizer != "ssd" or fixed:
        return [[plan]]
    return [[plan], [plan.replace(optimizer_cpu_blocks=k) for k in range(num_layers - 1, -1, -1)]]


def _pick(candidates: list[Prediction]) -> Prediction:
    """Fastest per token; near-ties (0.5%) to less SSD, then fewer, larger micro-batches (bigger GEMMs and
    fewer launches, which the cost model does not price), then less CPU and GPU memory."""
    best = min(p.iteration_s / p.step_tokens for p in candidates)
    near = [p for p in candidates if p.iteration_s / p.step_tokens <= best * NEAR_BEST]
    return min(near, key=lambda p: (p.ssd_bytes, p.plan.grad_accum, p.cpu_peak_bytes, p.gpu_peak_bytes,
                                    p.iteration_s / p.step_tokens))


def _add_swapped_internals(model: TransformerConfig, hardware: HardwareProfile, caps: Caps, start: Prediction,
                           gradient_ring: int = 0) -> Prediction:
    """Fuyou's activation swapping: block halves in order of recompute FLOPs saved per byte moved, added
    while the predicted iteration time falls and memory fits (CPU first, the SSD when the CPU is full)."""
    plan = start.plan
    if plan.activations == "none":
        return start
    flops = cost_model.block_forward_flops(model, plan.micro_batch_size, plan.seq_len)
    size = cost_model.sizes(model, plan)
    ranked = sorted(
        [("swapped_attention_blocks", flops.attention / size.attention_internals_bytes),
         ("swapped_mlp_blocks", flops.mlp / size.mlp_internals_bytes)],
        key=lambda unit: -unit[1],
    )
    best = start
    step = max(1, model.num_layers // 16)
    for field, _flops_per_byte in ranked:
        count = 0
        while count < model.num_layers:
            count = min(model.num_layers, count + step)
            trial = None
            for tier in ("cpu", "ssd"):
                candidate = best.plan.replace(**{field: count}, internals_tier=tier)
                if tier == "ssd" and hardware.ssd_count == 0:
                    continue
                if not shortfalls(memory_of(model, candidate, hardware, gradient_ring), caps):
                    trial = predict(model, candidate, hardware, gradient_ring=gradient_ring)
                    break
            if trial is None or trial.iteration_s >= best.iteration_s:
                break  # convex: past the minimum, more swapping only costs
            best = trial
    return best
