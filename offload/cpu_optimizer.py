"""AdamW on the CPU over flat fp32 groups whose state lives in the tiered store, on one worker thread.

The runtime hands this optimizer one group of parameters at a time (a transformer block, say) as soon
as the group's gradient is complete, so the update of group j runs on the CPU while the accelerator
goes on with the groups below it (Fuyou, section 4.3: the synchronous out-of-core CPU optimizer
overlapped with backward propagation). Everything here knows only flat tensors and string keys.

A group is one or more flat "parts" (a part per weight-decay class); each part has
    state  fp32 [3, n] in the store under `optim.{key}.{part}`: rows master weight, exp_avg, exp_avg_sq,
           on the CPU (updated in place) or on the SSD (read one group ahead, written back behind);
    grad   fp32 [n] in pinned CPU memory: the step's first micro-batch is copied into it from the
           accelerator, later ones are added; kept until the step is over, because a clipping fix-up
           (below) needs it.

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

from offload.futures import completed, then
from offload.store import Tier, TieredStore

MASTER, EXP_AVG, EXP_AVG_SQ = 0, 1, 2
KERNELS = ("torch", "deepspeed")


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
    step: int = 0  # Adam's t, counted per group
    sumsq: Future | None = None  # float: sum of squared gradient entries of this step
    ready: Future = field(default_factory=completed)  # the weights' home holds this group's latest update


class AdamWKernel:
    """One AdamW update of flat fp32 tensors in place, by `torch._fused_adamw_` or DeepSpeedCPUAdam.

    Args:
        kernel: "torch" or "deepspeed".
        betas, eps: AdamW's.
    """

    def __init__(self, kernel: str = "torch", *, betas: tuple[float, float], eps: float) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown CPU AdamW kernel {kernel!r}; use one of {', '.join(KERNELS)}")
        self.kernel, self.betas, self.eps = kernel, betas, eps
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
        if clip != 1.0 and self._deepspeed is not None:
            grad.mul_(clip)
        if self._deepspeed is not None:
            self._deepspeed.ds_opt_adam.adam_update(
                self._deepspeed.opt_id, step, lr, beta1, beta2, self.eps, weight_decay, True,
                master, grad, exp_avg, exp_avg_sq,
            )
            return
        step_tensor = torch.tensor(float(step))
        torch._fused_adamw_(
            [master], [grad], [exp_avg], [exp_avg_sq], [], [step_tensor],
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=self.eps, amsgrad=False, maximize=False,
            **({} if clip == 1.0 else {"grad_scale": torch.tensor(1.0 / clip), "found_inf": torch.tensor(0.0)}),
        )


class OffloadedAdamW:
    """AdamW whose fp32 master weights and moments live in `store` on `tier` (cpu or ssd).

    Args:
        store: the tiered store every state move goes through.
        tier: "cpu" (state updated in place in pinned CPU memory) or "ssd".
        betas, eps: AdamW's.
        kernel: see `AdamWKernel`.
    """

    def __init__(self, store: TieredStore, tier: Tier | str, *, betas: tuple[float, float], eps: float, kernel: str = "torch") -> None:
        self.store, self.tier = store, Tier(tier)
        assert self.tier in (Tier.CPU, Tier.SSD), "the optimizer runs on the CPU: its state lives on cpu or ssd"
        self.kernel = AdamWKernel(kernel, betas=betas, eps=eps)
        self.betas, self.eps = betas, eps
        self.groups: dict[str, _Group] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-adamw")
        self._prefetched: dict[str, Future] = {}  # part name -> fetch of its state into a CPU tensor
        # Worker seconds per kind of work (accumulate, update, fix_up, publish, state_wait): where the
        # CPU side of a step goes, for benchmarks.
        self.busy_s: dict[str, float] = collections.defaultdict(float)
        self.events: list[tuple[str, float, float]] | None = None  # (kind, start_s, end_s) per task once a profiler sets []
        self._lock = threading.Lock()

    # ---- set-up --------------------------------------------------------------------------------

    def add_group(self, key: str, masters: list[torch.Tensor], weight_decays: list[float],
                  publish: Callable[[list[torch.Tensor]], Future]) -> None:
        """Register a group: `masters` are its parts' initial fp32 weights (flat, any device).

        `publish(updated_masters)` is called on the worker after each update with the parts' fp32 CPU
        masters; it starts copying them (cast as needed) to where the weights are read from and returns
        a future done when they are there.
        """
        parts = []
        for index, (master, weight_decay) in enumerate(zip(masters, weight_decays)):
            state = torch.zeros(3, master.numel(), dtype=torch.float32)
            state[MASTER].copy_(master.reshape(-1))
            name = f"optim.{key}.{index}"
            self.store.put(name, state, self.tier).result()
            parts.append(_Part(name, master.numel(), weight_decay))
        self.groups[key] = _Group(parts, publish)

    # ---- tasks, run on the worker in submission order ------------------------------------------

    def gradient_buffers(self, key: str) -> list[torch.Tensor]:
        """Group `key`'s fp32 gradient accumulators (pinned CPU tensors from the store, one per part).

        The first micro-batch of a step copies its gradient straight into them (no CPU pass); they are
        free to overwrite once the group's update (and any fix-up) of the previous step has run, which
        the runtime guarantees by fetching a group's weights for a step only after `ready(key)`.
        """
        group = self.groups[key]
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

    def grad_norm(self) -> float:
        """The global L2 norm of the step's accumulated gradient (waits for every group's last accumulation)."""
        return math.sqrt(sum(group.sumsq.result() for group in self.groups.values()))

    def update(self, key: str, *, lr: float, clip: float = 1.0, next_key: str | None = None) -> Future:
        """AdamW step of group `key` with its gradient scaled by `clip`; returns `ready(key)`.

        `next_key`: the group updated next, whose state (on SSD) is read while this one computes.
        """
        group = self.groups[key]

        def task(state: list[torch.Tensor]) -> None:
            group.step += 1
            for part, part_state in zip(group.parts, state):
                self.kernel.step(part_state[MASTER], part.grad, part_state[EXP_AVG], part_state[EXP_AVG_SQ],
                                 step=group.step, lr=lr, weight_decay=part.weight_decay, clip=clip)

        return self._submit_with_state("update", key, next_key, task)

    def fix_up(self, key: str, *, lr: float, clip: float, next_key: str | None = None) -> Future:
        """Turn this step's speculative update of `key` (clip 1) into the update with `clip` (module docstring)."""
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
            state = [self._take_state(part.name) for part in group.parts]
            if next_key is not None and self.tier is Tier.SSD:
                # Read ahead: the next group's state streams in while this one computes.
                for part in self.groups[next_key].parts:
                    self._prefetch_state(part.name)
            wait_start_s = time.perf_counter()
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
            if self.tier is Tier.SSD:
                # Write back behind: the worker moves on; the store orders a later fetch after this write.
                for part, part_state in zip(group.parts, state):
                    self.store.write_back(part.name, part_state)
                    self.store.free(part_state)
            return published

        done = self._worker.submit(task)
        group.ready = then(done, done.result)
        return group.ready

    def _prefetch_state(self, name: str) -> None:
        with self._lock:
            if name not in self._prefetched:
                self._prefetched[name] = self.store.fetch(name, Tier.CPU)

    def _take_state(self, name: str) -> Future:
        if self.tier is Tier.CPU:
            return completed(self.store.home(name))
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
