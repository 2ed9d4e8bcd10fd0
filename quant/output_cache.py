"""Frozen NF4 linears whose forward outputs are kept for the recompute, so it skips their GEMMs.

Streamed QLoRA (quant/qlora_stream.py) checkpoints every block and recomputes it in backward, so each
frozen base GEMM runs three times a step: forward, recompute, input gradient (6 N FLOPs per token, N the
block parameters) where keeping every activation would run it twice (4 N) but does not fit. A frozen
linear's backward needs only its weight (dx = dy · W; the base gets no weight gradient, so not its input
x), and what the recompute needs from it is its output y. Keeping y from the forward lets the recompute
return it instead of running the GEMM; everything else in the block (norms, attention, activation
function, LoRA branches, dropout with the restored RNG) is still recomputed.

One output needs no keeping: the block's last linear (`mlp.down_proj`) feeds only the residual add, and
backprop never reads the recompute's output, so its recompute always returns an uninitialised tensor of
the output's shape (`CachePlan.skipped_flops`, no bytes; as runtime=fuyou's `Block.forward(output_unused)`).

Which outputs, within a budget. A linear with I inputs and O outputs saves 2·I·O FLOPs per token for O·e
bytes kept (e: bytes per element of its output): 2·I/e FLOPs per byte, so the ranking is by I, the same
recompute-saved-per-byte rule Fuyou ranks activations by (fuyou/plan). In a LLaMA block the rest all have
I = hidden size, so they keep module order: qkv_proj, o_proj, gate_up_proj. The budget is filled greedily: the best-ranked linear in every block, then the next, until the next output would not
fit. Ties keep block order, so blocks 0, 1, ... get the next kind first; any blocks would do, each costs
the same bytes.

Legend: T tokens of the micro-batch, O output features, j block index.

Why not a library: torch.utils.checkpoint's selective checkpointing (`create_selective_checkpoint_contexts`)
keeps chosen op outputs in the same way, but the streamed schedule recomputes explicitly (the recompute
needs the block's NF4 weights fetched ahead, at a point the schedule chooses, which a checkpoint hook
cannot prefetch), and a per-op policy has no byte budget across blocks. The input gradient itself is
bitsandbytes' (`MatMul4Bit.backward`'s formula on `dequantize_4bit`), not re-implemented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit
from torch import nn

from fuyou.models.transformer import LAST_LINEAR


@dataclass(frozen=True)
class CachePlan:
    """Which block linears keep their outputs for a micro-batch of `num_tokens` tokens.

    Attributes:
        num_tokens: T, the micro-batch's tokens the plan was made for.
        chosen: (block index j, module name) pairs whose output is kept.
        num_bytes: the kept outputs' bytes, T·O·e summed over `chosen`.
        flops_saved: recompute FLOPs skipped per micro-batch, 2·T·I·O summed over `chosen`.
        skipped_flops: recompute FLOPs skipped per micro-batch without keeping anything (every block's
            last linear).
    """

    num_tokens: int
    chosen: frozenset[tuple[int, str]]
    num_bytes: int
    flops_saved: int
    skipped_flops: int = 0


class FrozenOutputCache:
    """Keeps chosen frozen linears' forward outputs on the compute device until their block's recompute.

    Use per block j: `with cache.recording(j):` around its forward (no graph), `with cache.replaying(j):`
    around its recompute (with a graph). A block's outputs are dropped as its recompute takes them.

    Args:
        blocks: the model's blocks, their frozen linears bitsandbytes `Linear4bit` modules (possibly
            inside peft LoRA layers).
        budget_bytes: device memory for kept outputs; 0 keeps none.
        element_bytes: e, bytes per output element the plan assumes (2 under bf16 compute, 4 in fp32).
            An output that turns out larger (e.g. a LayerNorm's fp32 output under autocast feeding a
            linear) is not kept once it would pass the budget: the budget binds either way.
    """

    def __init__(self, blocks: Sequence[nn.Module], *, budget_bytes: int, element_bytes: int) -> None:
        assert budget_bytes >= 0 and element_bytes > 0
        self.budget_bytes, self.element_bytes = budget_bytes, element_bytes
        # Per block: name -> Linear4bit, in the block's module order.
        self.linears = [{name: module for name, module in block.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
                        for block in blocks]
        # The last linear's name here (under peft: "mlp.down_proj.base_layer").
        self.last = [name for name in self.linears[0] if name.startswith(LAST_LINEAR)]
        assert len(self.last) == 1, f"no single {LAST_LINEAR} among {list(self.linears[0])}"
        self.plan = CachePlan(0, frozenset(), 0, 0)
        self._kept: dict[tuple[int, str], torch.Tensor] = {}
        self.kept_bytes = 0
        self.peak_bytes = 0

    def plan_for(self, num_tokens: int) -> CachePlan:
        """The plan for `num_tokens` tokens (module docstring's ranking), made once per micro-batch size."""
        if num_tokens == self.plan.num_tokens:
            return self.plan
        # (O, I) from the module: its quantization state is only there while the block is installed.
        shapes = {name: (module.out_features, module.in_features) for name, module in self.linears[0].items()}
        out_features, in_features = shapes[self.last[0]]
        skipped = len(self.linears) * 2 * num_tokens * in_features * out_features
        ranked = sorted(set(shapes) - set(self.last), key=lambda name: (-shapes[name][1], list(shapes).index(name)))
        chosen, used_bytes, flops = set(), 0, 0
        for name in ranked:
            out_features, in_features = shapes[name]
            num_bytes = num_tokens * out_features * self.element_bytes
            for j in range(len(self.linears)):
                if used_bytes + num_bytes > self.budget_bytes:
                    break
                chosen.add((j, name))
                used_bytes += num_bytes
                flops += 2 * num_tokens * in_features * out_features
        self.plan = CachePlan(num_tokens, frozenset(chosen), used_bytes, flops, skipped)
        return self.plan

    @contextlib.contextmanager
    def recording(self, j: int) -> Iterator[None]:
        """Block j's forward: its chosen linears run as usual and their outputs are kept.

        Each output is caught in its own slot while the block runs and kept, in module order, when the
        block is done if it still fits the budget. So the patched forwards read and write no counters: a
        block compiled whole (`train.compile`) traces them without guarding on the bytes kept so far,
        which differ per block and would recompile the graph for each.
        """
        names = [name for name in self.linears[j] if (j, name) in self.plan.chosen]
        slots: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        with _patched(self.linears[j], names, lambda name, module: _recorder(slots[name], module)):
            yield
        for name in names:
            for y in slots[name]:  # one output per forward; a module called twice would keep the first
                if (j, name) not in self._kept and self.kept_bytes + y.nbytes <= self.budget_bytes:
                    self._kept[(j, name)] = y
                    self.kept_bytes += y.nbytes
        self.peak_bytes = max(self.peak_bytes, self.kept_bytes)

    @contextlib.contextmanager
    def replaying(self, j: int) -> Iterator[None]:
        """Block j's recompute, only differentiated: its chosen linears return their kept outputs and its
        last linear an uninitialised one, their GEMMs skipped. The kept outputs leave the cache here."""
        kept = {name: self._kept.pop((j, name)) for name in self.linears[j] if (j, name) in self._kept}
        self.kept_bytes -= sum(y.nbytes for y in kept.values())
        names = [name for name in self.linears[j] if name in kept or name in self.last]

        def make_forward(name: str, module: nn.Module):
            return _skipper(module) if name in self.last else _replayer(kept.pop(name), module)

        with _patched(self.linears[j], names, make_forward):
            yield

    def clear(self) -> None:
        """Drop every kept output (e.g. after a failed step)."""
        self._kept.clear()
        self.kept_bytes = 0


@contextlib.contextmanager
def _patched(linears: dict[str, nn.Module], names: list[str], make_forward) -> Iterator[None]:
    """Give `names`' modules an instance `forward` for the duration (nn.Module.__call__ looks it up first)."""
    try:
        for name in names:
            linears[name].forward = make_forward(name, linears[name])
        yield
    finally:
        for name in names:
            linears[name].__dict__.pop("forward", None)


def _recorder(slot: list[torch.Tensor], module: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = type(module).forward(module, x)
        slot.append(y)  # peft clones the base output before adding the LoRA branch: nothing writes into y later
        return y

    return forward


def _replayer(y_kept: torch.Tensor, module: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _KeptFrozenLinear.apply(x, y_kept, module)

    return forward


def _skipper(module: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        # Linear4bit returns its input's dtype; the values are never read (module docstring).
        return _KeptFrozenLinear.apply(x, x.new_empty((*x.shape[:-1], module.out_features)), module)

    return forward


class _KeptFrozenLinear(torch.autograd.Function):
    """y = the kept output of a frozen Linear4bit at x; dx = dy · dequantize(W), as bitsandbytes'
    `MatMul4Bit.backward` computes it (its weight, bias and quantization state get no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y_kept: torch.Tensor, module: nn.Module) -> torch.Tensor:
        assert y_kept.shape[:-1] == x.shape[:-1], "kept output from another micro-batch shape"
        ctx.module, ctx.x_dtype = module, x.dtype
        return y_kept.detach()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weight = ctx.module.weight
        w_OI = dequantize_4bit(weight.data.view(-1, 1), weight.quant_state).to(grad_y.dtype)
        return torch.matmul(grad_y, w_OI).to(ctx.x_dtype), None, None
