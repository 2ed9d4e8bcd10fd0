"""Delayed scaling for HALO's FP8 operands: each tensor's scale comes from the amaxes of earlier steps.

Why. With current scaling (quant.halo, the default) a tensor's scale is its own amax / 448, so the cast
waits for a full reduction over the tensor. Under `train.compile` Inductor then cannot write the FP8
copies from the producer's kernel the way it writes bf16: `benchmarks.diag.fp8_layouts` timed GELU's
backward on [16384, 8192] (H100) at 0.276 ms writing bf16, 0.675 ms with current scaling (amax, then
both FP8 layouts), and 0.321 ms writing both layouts with the scale given. A known scale makes the
quantizer a store in the producer's kernel. Transformer Engine's default recipe is delayed scaling for
the same reason. Measured end to end (GPT-3 1.3B shape, batch 8 x 2048, train.compile, H100): with torch-op
casts, 6-8 ms less kernel time a step than current scaling but the same step time (253.6 against 254.6 ms),
since the extra small kernels leave the GPU idle longer; with the GPT MLP's casts in `quant.fp8_cast`'s kernel
(`quant.halo_mlp`, which needs a known scale), 245.3 against 260.9 ms, 1.24x the bf16 step, the loss equal
(benchmarks/RESULTS.md, twelfth and thirteenth sessions).

State. Each HaloLinear holds one fp32 tensor `amax_state` [H + 1, 4]; its columns are the operands
x, w, dy, and dy rotated along tokens (level 2's input gradient) (OPERANDS).
- Rows 0..H-1 are the history: the amaxes of the last H optimizer steps, a ring (only their max is read,
  so their order does not matter).
- Row H is pending: the running max of this step's amaxes.

Within a step the scale reads only the history, so it is the same for every micro-batch and for a
recompute. Activation checkpointing's recompute therefore quantizes exactly as the forward did, and recording twice changes nothing, since pending is a max. `end_step` moves
pending into the history once per optimizer step: the trainer calls it after each step. It is two
foreach kernels for the whole model, since it runs after the step's loss was read, while the GPU waits.
For the same reason its host work is kept small: the per-layer views and the module list are made once per
model and reused (`_Plan`). Walking the modules and indexing each state anew took 3.0 ms of GPU idle a step
in a profiled 1.3B step (96 layers; `benchmarks.diag.halo_step`'s idle gaps, fourteenth session).

Scale. s = MARGIN · max(history) / 448. The largest recent amax maps to 448 / MARGIN = 224, so a tensor
may grow MARGIN× over its recent maximum before it saturates. Values past 448 · s are clamped to ±448
(saturation, as Transformer Engine does), never NaN. The headroom costs nothing in precision: e4m3
keeps 3 mantissa bits at every normal magnitude, and only values below about 2^-14 of the amax
(448 / 2^-6 is 2^14.8) reach its subnormals one binade earlier.

Amax. It is read back from the FP8 values, |q|max · s: one byte an element, instead of a second pass
over the producer's inputs. It is exact, since every e4m3 value is exact in fp32, unless |q|max = 448,
where values may have been clamped. That case is recorded as MARGIN · 448 · s, so the next scale grows
MARGIN×, and again each step until the tensor fits. The GELU MLP's activation and its gradient are cast by
`quant.fp8_cast`'s kernel instead (`quant.halo_mlp`), which sees the values before the clamp and records
their exact amax.

First step. There is no history yet. The module quantizes with current scaling and records exact
amaxes. `end_step` then switches it to delayed scaling: one recompile under `train.compile`, since the
switch is a Python attribute that dynamo guards on.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MARGIN = 2.0
OPERANDS = ("x", "w", "dy", "dy rotated along tokens")
DEFAULT_HISTORY = 16  # Transformer Engine keeps up to 1024; 16 steps forget a spike soon and still smooth noise


def new_state(history: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A zero `amax_state` [history + 1, len(OPERANDS)] fp32 (module docstring, State)."""
    if history < 1:
        raise ValueError(f"the amax history needs at least one step, got {history}")
    global _states_made
    _states_made += 1  # a new state may belong to a model end_step already planned for
    return torch.zeros(history + 1, len(OPERANDS), dtype=torch.float32, device=device)


def scale_from_history(row: torch.Tensor) -> torch.Tensor:
    """s = MARGIN · max(history) / 448 of one operand's record (a column of the state, [H + 1]); 1 if
    nothing was recorded."""
    amax = row[:-1].max()
    return torch.where(amax > 0, amax * (MARGIN / FP8_MAX), torch.ones_like(amax))


def cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in FP8, clamped to ±448: a tensor that outgrew its history saturates rather than overflows."""
    return (x.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def record_exact(row: torch.Tensor, amax: torch.Tensor) -> None:
    """pending = max(pending, amax), with an amax the quantizer computed anyway (current scaling)."""
    row[-1] = torch.maximum(row[-1], amax.float())


def record_from_fp8(row: torch.Tensor, x_fp8: torch.Tensor, scale: torch.Tensor) -> None:
    """pending = max(pending, the amax read back from x_fp8 = cast(x, scale)); a clamped one grows MARGIN×."""
    amax_fp8 = x_fp8.float().abs().amax(dim=-1).amax()  # by rows first: Inductor's fast reduction shape
    saturated = amax_fp8 >= FP8_MAX
    record_exact(row, torch.where(saturated, MARGIN * FP8_MAX, amax_fp8) * scale)


class _Plan:
    """end_step's view of one model, made once: the modules that hold a state, each state's history rows and
    pending row as views. Valid while no state was made since (`new_state` counts) and every module still
    holds the state it held (a test or a user may assign a new one)."""

    def __init__(self, model: nn.Module):
        self.made = _states_made
        self.modules = [m for m in model.modules() if getattr(m, "amax_state", None) is not None]
        self.states = [m.amax_state for m in self.modules]
        self.history_rows = [list(state[:-1].unbind(0)) for state in self.states]
        self.pendings = [state[-1] for state in self.states]

    def valid(self) -> bool:
        return self.made == _states_made and all(m.amax_state is s for m, s in zip(self.modules, self.states))


_states_made = 0
_plans: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def end_step(model: nn.Module) -> int:
    """Ends an optimizer step for every delayed-scaling HaloLinear of `model`: pending replaces the oldest
    history entry, pending restarts at 0, and a module that just had its first step switches from current
    to delayed scaling. Returns how many modules were updated."""
    plan = _plans.get(model)
    if plan is None or not plan.valid():
        plan = _plans[model] = _Plan(model)
    slots = []
    for module, rows in zip(plan.modules, plan.history_rows):
        steps = getattr(module, "amax_steps", 0)
        slots.append(rows[steps % len(rows)])
        # Plain attributes: object.__setattr__ is what nn.Module.__setattr__ ends in for them, without its
        # parameter/buffer/module checks (which made these two lines half of end_step's host time).
        object.__setattr__(module, "amax_steps", steps + 1)
        if not getattr(module, "delayed_active", False):
            module.delayed_active = True
    if plan.pendings:
        with torch.no_grad():
            torch._foreach_copy_(slots, plan.pendings)
            torch._foreach_zero_(plan.pendings)
    return len(plan.pendings)
