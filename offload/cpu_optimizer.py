"""AdamW on the CPU over flat fp32 groups whose state lives in the tiered store, on one worker thread.

The runtime hands this optimizer one group of parameters at a time (a transformer block, say) as soon
as the group's gradient is complete, so the update of group j runs on the CPU while the accelerator
goes on with the groups below it (Fuyou, section 4.3: the synchronous out-of-core CPU optimizer
overlapped with backward propagation). Everything here knows only flat tensors and string keys.

A group is one or more flat "parts" (a part per weight-decay class); each part has
    state  fp32 [3, n] in the store under `optim.{key}.{part}`: rows master weight, exp_avg, exp_avg_sq,
           on the group's tier: the CPU (updated in place) or the SSD (read one group ahead, written
           back behind). Each group has its own tier, so one run can keep some groups' state in RAM and
           the rest on the SSD.
    grad   fp32 [n] in pinned CPU memory: the step's first micro-batch is copied into it from the
           accelerator, later ones are added. By default each group owns its accumulator for the whole
           run, kept until the step is over because a clipping fix-up or a deferred update (below) needs
           it after backward. When neither can happen (one micro-batch per step, no clipping), a
           `GradientRing` of a few group-sized buffers serves every group instead: a buffer is taken
           when the group's gradient leaves the accelerator and given back once its update has run, so
           the gradients take a few groups' worth of RAM rather than 4 bytes for every parameter.

Tasks (accumulate, update, fix-up) run on one worker thread in submission order, so a group's
accumulation always precedes its update without locks. The arithmetic is a library kernel:
`torch._fused_adamw_` (torch's fused CPU AdamW, the kernel behind `torch.optim.AdamW(fused=True)`,
bit-identical to torch's default AdamW in our tests) or DeepSpeed's `DeepSpeedCPUAdam` (adamw_mode),
imported lazily because its first use JIT-compiles for minutes.

Clipping fix-up (the exact correction when an update was applied speculatively with clip factor 1 and
the global norm later asks for factor c < 1). With g the unclipped gradient, AdamW's moments are linear
in g and g^2, and the decay term does not depend on g, so from the speculative results (w1, m1, v1):
    m_c = m1 - (1 - beta1) (1 - c) g
    v_c = v1 - (1 - beta2) (1 - c^2) g^2
    w_c = w1 + lr (u(m1, v1) - u(m_c, v_c)),   u(m, v) = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)
with bc1 = 1 - beta1^t, bc2 = 1 - beta2^t: the same values as clipping first, within fp32 rounding. The
rounding of m1 and v1 is amplified by 1/c and 1/c^2 where the moments were near zero (first steps with
heavy clipping), which is why the runtime only speculates when the previous step did not clip.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from offload.errors import OffloadError
from offload.futures import completed, gather, then
from offload.store import Tier, TieredStore

MASTER, EXP_AVG, EXP_AVG_SQ = 0, 1, 2
KERNELS = ("torch", "deepspeed")
# Pinned buffers that SSD groups' states pass through: one being written back, one being updated,
# one being read ahead. Each new buffer is taken only once the writes issued before it leave room,
# so the count holds however the disk orders reads and writes.
SSD_STATE_BUFFERS = 3


@dataclass
class _Part:
    name: str  # the state's name in the store
    numel: int
    weight_decay: float
    grad: torch.Tensor | None = None  # fp32 [numel] CPU accumulator of the current step, reused across steps


@dataclass
class _Group:
    parts: list[_Part]
    publish: Callable[[list[torch.Tensor]], Future]  # updated fp32 masters -> copies to the weights' home done
    tier: Tier  # where the state lives: CPU or SSD
    step: int = 0  # Adam's t, counted per group
    sumsq: Future | None = None  # float: sum of squared gradient entries of this step
    ready: Future = field(default_factory=completed)  # the weights' home holds this group's latest update


class AdamWKernel:
    """One AdamW update of flat fp32 tensors in place, by `torch._fused_adamw_` or DeepSpeedCPUAdam.

    Args:
        kernel: "torch" or "deepspeed".
        betas, eps: AdamW's.
        fold_clip: torch's kernel only: apply a clip factor through the kernel's own `grad_scale` (True)
            or as a separate pass over the gradient first (False); see `step`.
    """

    def __init__(self, kernel: str = "torch", *, betas: tuple[float, float], eps: float, fold_clip: bool = True) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown CPU AdamW kernel {kernel!r}; use one of {', '.join(KERNELS)}")
        self.kernel, self.betas, self.eps, self.fold_clip = kernel, betas, eps, fold_clip
        self._deepspeed = None
        if kernel == "deepspeed":
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT build on first use (minutes)

            # The optimizer object is only a handle to the C++ kernel; its own param list is a dummy.
            self._deepspeed = DeepSpeedCPUAdam([torch.zeros(1)], betas=betas, eps=eps, adamw_mode=True)

    def step(self, master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
             *, step: int, lr: float, weight_decay: float, clip: float = 1.0) -> None:
        """Update `master`, `exp_avg`, `exp_avg_sq` (fp32 CPU, same shape) for Adam step `step` (1-based).

        `clip` scales the gradient first, as torch.nn.utils.clip_grad_norm_ does; `grad` may be
        overwritten with the scaled gradient. torch's kernel folds the scale into its own pass
        (its `grad_scale`, which divides: 1 / clip), saving a pass over the gradient.
        """
        beta1, beta2 = self.betas
        if clip != 1.0 and (self._deepspeed is not None or not self.fold_clip):
            grad.mul_(clip)
            clip = 1.0
        if self._deepspeed is not None:
            self._deepspeed.ds_opt_adam.adam_update(
                self._deepspeed.opt_id, step, lr, beta1, beta2, self.eps, weight_decay, True,
                master, grad, exp_avg, exp_avg_sq,
            )
            return
        device = master.device  # CPU here; the compute device for offload.resident_optimizer
        step_tensor = torch.tensor(float(step), device=device)
        torch._fused_adamw_(
            [master], [grad], [exp_avg], [exp_avg_sq], [], [step_tensor],
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=self.eps, amsgrad=False, maximize=False,
            **({} if clip == 1.0 else {"grad_scale": torch.tensor(1.0 / clip, device=device),
                                       "found_inf": torch.tensor(0.0, device=device)}),
        )


class GradientRing:
    """A few reusable fp32 gradient buffers in pinned CPU memory, each large enough for any group.

    Groups take a buffer when their gradient leaves the accelerator and give it back after their
    update, in any order. Taking waits while every buffer is out (backpressure: backward pauses
    while the CPU optimizer is behind), and refuses to wait when no update that would return a
    buffer has been queued, because then nothing ever would (a deadlock, raised instead).

    Args:
        store: allocates the buffers (counted against its pinned CPU budget).
        num_buffers: how many groups' gradients may be out at once, >= 1.
        part_numels: the largest group's element count per part index.
    """

    def __init__(self, store: TieredStore, num_buffers: int, part_numels: list[int]) -> None:
        assert num_buffers >= 1
        self.buffers = [[store.empty((max(n, 1),), torch.float32, Tier.CPU) for n in part_numels] for _ in range(num_buffers)]
        self._free = list(range(num_buffers))
        self._held: dict[str, int] = {}  # group key -> buffer index
        self._owed: set[str] = set()  # holders whose update is queued: their buffer will come back
        self._cond = threading.Condition()

    def take(self, key: str, numels: list[int]) -> list[torch.Tensor]:
        """A free buffer's first `numels[p]` elements per part, for group `key`; waits for one if needed.

        Raises:
            OffloadError: every buffer is out and no queued update will return one.
        """
        with self._cond:
            assert key not in self._held, f"{key} already holds a gradient buffer"
            while not self._free:
                if not self._owed:
                    raise OffloadError(
                        f"all {len(self.buffers)} gradient buffers are held by groups with no update queued, so none "
                        "would come back; queue each group's update right after its gradient (or use full-size buffers)"
                    )
                self._cond.wait()
            index = self._free.pop(0)
            self._held[key] = index
        return [buffer[:n] for buffer, n in zip(self.buffers[index], numels)]

    def owe(self, key: str) -> None:
        """`key`'s update is queued: its buffer will come back (so waiting for it cannot deadlock)."""
        with self._cond:
            if key in self._held:
                self._owed.add(key)

    def give_back(self, key: str) -> None:
        """`key`'s update has read its gradient: its buffer is free for the next group."""
        with self._cond:
            index = self._held.pop(key, None)
            self._owed.discard(key)
            if index is not None:
                self._free.append(index)
                self._cond.notify_all()


class OffloadedAdamW:
    """AdamW whose fp32 master weights and moments live in `store`, each group on the CPU or the SSD.

    Args:
        store: the tiered store every state move goes through.
        tier: the groups' default tier: "cpu" (state updated in place in pinned CPU memory) or "ssd".
        betas, eps: AdamW's.
        kernel: see `AdamWKernel`.
        gradient_ring: 0: each group owns a full-size fp32 gradient accumulator for the whole run;
            n > 0: the groups share n buffers (`GradientRing`), which needs every step to be one
            micro-batch whose groups are updated during backward (no fix-up, no deferred update).
    """

    def __init__(self, store: TieredStore, tier: Tier | str, *, betas: tuple[float, float], eps: float, kernel: str = "torch",
                 gradient_ring: int = 0) -> None:
        self.store, self.tier = store, Tier(tier)
        assert self.tier in (Tier.CPU, Tier.SSD), "the optimizer runs on the CPU: its state lives on cpu or ssd"
        assert gradient_ring >= 0
        self.kernel = AdamWKernel(kernel, betas=betas, eps=eps)
        self.betas, self.eps = betas, eps
        self.groups: dict[str, _Group] = {}
        self.gradient_ring_size = gradient_ring
        self.ring: GradientRing | None = None  # built at the first gradient, once every group is known
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-adamw")
        self._prefetched: dict[str, Future] = {}  # part name -> fetch of its state into a CPU tensor
        # Per SSD group whose state is being written (add_group's first write, each update's write-back),
        # oldest first: done once written and its buffer is back in the pool (see SSD_STATE_BUFFERS).
        self._ssd_writes: collections.deque[Future] = collections.deque()
        # Worker seconds per kind of work (accumulate, update, fix_up, publish, state_wait): where the
        # CPU side of a step goes, for benchmarks.
        self.busy_s: dict[str, float] = collections.defaultdict(float)
        self.events: list[tuple[str, float, float]] | None = None  # (kind, start_s, end_s) per task once a profiler sets []
        self._lock = threading.Lock()

    # ---- set-up --------------------------------------------------------------------------------

    def add_group(self, key: str, masters: list[torch.Tensor], weight_decays: list[float],
                  publish: Callable[[list[torch.Tensor]], Future], *, tier: Tier | str | None = None) -> None:
        """Register a group: `masters` are its parts' initial fp32 weights (flat, any device).

        `publish(updated_masters)` is called on the worker after each update with the parts' fp32 CPU
        masters; it starts copying them (cast as needed) to where the weights are read from and returns
        a future done when they are there. `tier`: where this group's state lives (default: the
        optimizer's `tier`).

        The state is built once, in a pinned buffer from the store: on the CPU that buffer becomes its
        home; for the SSD it is written out from there directly, behind the caller, with at most two
        groups' writes in flight, so building a model larger than RAM overlaps the disk without piling
        up buffers.
        """
        tier = self.tier if tier is None else Tier(tier)
        assert tier in (Tier.CPU, Tier.SSD), "the optimizer runs on the CPU: its state lives on cpu or ssd"
        if tier is Tier.SSD:
            self._wait_for_ssd_writes(SSD_STATE_BUFFERS - 1)  # this group's buffer is the next one
        parts, writes = [], []
        for index, (master, weight_decay) in enumerate(zip(masters, weight_decays)):
            state = self.store.empty((3, master.numel()), torch.float32, Tier.CPU)
            state[MASTER].copy_(master.reshape(-1))
            state[EXP_AVG:].zero_()
            name = f"optim.{key}.{index}"
            if tier is Tier.CPU:
                self.store.adopt(name, state)
            else:
                writes += [self.store.put(name, state, tier), self.store.free(state)]  # the buffer serves the next SSD group
            parts.append(_Part(name, master.numel(), weight_decay))
        if writes:
            self._ssd_writes.append(gather(writes))
        self.groups[key] = _Group(parts, publish, tier)

    # ---- tasks, run on the worker in submission order ------------------------------------------

    def gradient_buffers(self, key: str) -> list[torch.Tensor]:
        """Group `key`'s fp32 gradient accumulators (pinned CPU tensors from the store, one per part).

        The first micro-batch of a step copies its gradient straight into them (no CPU pass); they are
        free to overwrite once the group's update (and any fix-up) of the previous step has run, which
        the runtime guarantees by fetching a group's weights for a step only after `ready(key)`.
        """
        group = self.groups[key]
        if self.gradient_ring_size:
            if self.ring is None:
                num_parts = max(len(g.parts) for g in self.groups.values())
                part_numels = [max(g.parts[p].numel for g in self.groups.values() if p < len(g.parts)) for p in range(num_parts)]
                self.ring = GradientRing(self.store, self.gradient_ring_size, part_numels)
            for part, buffer in zip(group.parts, self.ring.take(key, [part.numel for part in group.parts])):
                part.grad = buffer
            return [part.grad for part in group.parts]
        for part in group.parts:
            if part.grad is None:  # allocated once and reused: no page faults on every step
                part.grad = self.store.empty((part.numel,), torch.float32, Tier.CPU)
        return [part.grad for part in group.parts]

    def accumulate(self, key: str, grads: list[torch.Tensor] | None, arrived: Future, *, last: bool,
                   norms: torch.Tensor | None = None) -> Future:
        """Account one micro-batch's gradient of group `key` once `arrived` is done (its D2H copies).

        `grads`: CPU tensors to add into the accumulators, or None when the micro-batch was copied
        into `gradient_buffers(key)` directly (the step's first). `last` ends the step's
        accumulation: the group's squared norm for clipping is taken from `norms` (fp32 per-part
        L2 norms of the complete gradient, already on the CPU when `arrived` is done: the compute
        device took them), or else from the accumulators in one more pass. Returns the task's future
        (done when `grads` may be reused).
        """
        group = self.groups[key]

        def task() -> float | None:
            arrived.result()
            start_s = time.perf_counter()
            if grads is not None:
                for part, grad in zip(group.parts, grads):
                    part.grad.add_(grad.reshape(-1))
            sumsq = None
            if last:
                # fp32 norms per part, as torch.nn.utils.clip_grad_norm_ takes them per tensor.
                part_norms = norms.tolist() if norms is not None else [torch.linalg.vector_norm(p.grad).item() for p in group.parts]
                sumsq = sum(norm**2 for norm in part_norms)
            self.busy_s["accumulate"] += time.perf_counter() - start_s
            if self.events is not None:
                self.events.append(("accumulate", start_s, time.perf_counter()))
            return sumsq

        future = self._worker.submit(task)
        if last:
            group.sumsq = future
        return future

    def grad_sumsq(self) -> float:
        """The squared global L2 norm of the step's accumulated gradient (waits for every group's last accumulation)."""
        return sum(group.sumsq.result() for group in self.groups.values())

    def grad_norm(self) -> float:
        """The global L2 norm of the step's accumulated gradient (waits for every group's last accumulation)."""
        return math.sqrt(self.grad_sumsq())

    def read_ahead(self, key: str) -> None:
        """Start reading group `key`'s state from the SSD now, behind the queued tasks (no-op for a group in RAM).

        What `update(..., next_key=key)` does for the group updated next, for a caller whose previous
        update is not this optimizer's (the resident outer group, offload.resident_optimizer)."""
        if self.groups[key].tier is not Tier.SSD:
            return

        def task() -> None:
            self._wait_for_ssd_writes(SSD_STATE_BUFFERS - 2)
            for part in self.groups[key].parts:
                self._prefetch_state(part.name)

        self._worker.submit(task)

    def update(self, key: str, *, lr: float, clip: float = 1.0, next_key: str | None = None) -> Future:
        """AdamW step of group `key` with its gradient scaled by `clip`; returns `ready(key)`.

        `next_key`: the group updated next, whose state (on SSD) is read while this one computes.
        """
        group = self.groups[key]

        def task(state: list[torch.Tensor]) -> None:
            group.step += 1
            try:
                for part, part_state in zip(group.parts, state):
                    self.kernel.step(part_state[MASTER], part.grad, part_state[EXP_AVG], part_state[EXP_AVG_SQ],
                                     step=group.step, lr=lr, weight_decay=part.weight_decay, clip=clip)
            finally:
                if self.ring is not None:  # the gradient is spent: its buffer goes to the next group
                    for part in group.parts:
                        part.grad = None
                    self.ring.give_back(key)

        if self.ring is not None:
            self.ring.owe(key)
        return self._submit_with_state("update", key, next_key, task)

    def fix_up(self, key: str, *, lr: float, clip: float, next_key: str | None = None) -> Future:
        """Turn this step's speculative update of `key` (clip 1) into the update with `clip` (module docstring)."""
        assert not self.gradient_ring_size, "a fix-up needs the step's gradient, which the gradient ring gave back"
        group = self.groups[key]
        beta1, beta2 = self.betas

        def direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
            bias1, bias2 = 1 - beta1**group.step, 1 - beta2**group.step
            return (exp_avg / bias1) / (exp_avg_sq.sqrt() / math.sqrt(bias2) + self.eps)

        def task(state: list[torch.Tensor]) -> None:
            for part, part_state in zip(group.parts, state):
                master, exp_avg, exp_avg_sq = part_state[MASTER], part_state[EXP_AVG], part_state[EXP_AVG_SQ]
                speculative = direction(exp_avg, exp_avg_sq)
                exp_avg.sub_(part.grad, alpha=(1 - beta1) * (1 - clip))
                exp_avg_sq.sub_(part.grad.square(), alpha=(1 - beta2) * (1 - clip * clip)).clamp_(min=0)
                master.add_(speculative.sub_(direction(exp_avg, exp_avg_sq)), alpha=lr)

        return self._submit_with_state("fix_up", key, next_key, task)

    def _submit_with_state(self, kind: str, key: str, next_key: str | None, compute: Callable[[list[torch.Tensor]], None]) -> Future:
        group = self.groups[key]

        def task() -> Future:
            wait_start_s = time.perf_counter()  # waits for room (earlier write-backs) count as state_wait too
            state = [self._take_state(group, part.name) for part in group.parts]
            if next_key is not None and self.groups[next_key].tier is Tier.SSD:
                # Read ahead: the next group's state streams in while this one computes, into the buffer
                # of the write-back before last (issued first, so usually done by now).
                self._wait_for_ssd_writes(SSD_STATE_BUFFERS - 2)
                for part in self.groups[next_key].parts:
                    self._prefetch_state(part.name)
            state = [future.result() for future in state]
            start_s = time.perf_counter()
            self.busy_s["state_wait"] += start_s - wait_start_s
            compute(state)
            compute_end_s = time.perf_counter()
            self.busy_s[kind] += compute_end_s - start_s
            published = group.publish([part_state[MASTER] for part_state in state])
            self.busy_s["publish"] += time.perf_counter() - compute_end_s
            if self.events is not None:
                self.events += [("state_wait", wait_start_s, start_s), (kind, start_s, compute_end_s), ("publish", compute_end_s, time.perf_counter())]
            if group.tier is Tier.SSD:
                # Write back behind: the worker moves on; the store orders a later fetch after this write.
                writes = []
                for part, part_state in zip(group.parts, state):
                    writes += [self.store.write_back(part.name, part_state), self.store.free(part_state)]
                self._ssd_writes.append(gather(writes))
            return published

        done = self._worker.submit(task)
        group.ready = then(done, done.result)
        return group.ready

    def _wait_for_ssd_writes(self, at_most: int) -> None:
        while len(self._ssd_writes) > at_most:
            self._ssd_writes.popleft().result()

    def _prefetch_state(self, name: str) -> None:
        with self._lock:
            if name not in self._prefetched:
                self._prefetched[name] = self.store.fetch(name, Tier.CPU)

    def _take_state(self, group: _Group, name: str) -> Future:
        if group.tier is Tier.CPU:
            # Updated in place: first every move still reading it (a fetch of `master_rows`) must be done.
            return completed(self.store.settled(name))
        if name not in self._prefetched:
            self._wait_for_ssd_writes(SSD_STATE_BUFFERS - 1)  # not read ahead: its buffer is the next one
        self._prefetch_state(name)
        with self._lock:
            return self._prefetched.pop(name)

    # ---- step boundary, reads, lifetime --------------------------------------------------------

    def ready(self, key: str) -> Future:
        """Done when the weights' home holds group `key`'s latest update (or at once, before any update)."""
        return self.groups[key].ready

    def end_step(self) -> Future:
        """Close the step's norm bookkeeping once every queued task has run; returns that moment's future.

        The gradient buffers stay allocated for the next step (they are overwritten by its first
        accumulation), so steady state allocates nothing.
        """

        def task() -> None:
            for group in self.groups.values():
                group.sumsq = None

        return self._worker.submit(task)

    def master_rows(self, key: str) -> list[torch.Tensor]:
        """Group `key`'s fp32 master weights in place (views of its state in CPU RAM, one per part), for a
        caller that copies them out through the store between updates: the next update of the group
        waits for those copies (the store's write-after-read order, taken in `_take_state`)."""
        group = self.groups[key]
        if group.tier is not Tier.CPU:
            raise OffloadError(f"group {key!r} keeps its state on the {group.tier.value}; its masters are not in RAM")
        return [self.store.home(part.name)[MASTER] for part in group.parts]

    def masters(self, key: str) -> list[torch.Tensor]:
        """Copies of group `key`'s fp32 master weights on the CPU, after every queued task."""
        self._worker.submit(lambda: None).result()
        self.store.synchronize()
        out = []
        for part in self.groups[key].parts:
            work = self.store.fetch(part.name, Tier.CPU).result()
            out.append(work[MASTER].clone())
            self.store.free(work)
        return out

    def close(self) -> None:
        """Finish queued tasks and stop the worker (the store owns, and frees, the state)."""
        self._worker.shutdown(wait=True)
