"""`train.compile`: each transformer block's forward, and its backward, as one torch.compile graph.

Why. Eager bf16 autocast runs a block's norms, GELU/SiLU, residual adds, rotary and autocast casts as
separate memory-bound kernels between its GEMMs: `fuyou probe` measured one GPT-3 2.7B block's forward
+ backward at 0.72 of the H100's bf16 GEMM rate. Inductor fuses those kernels, and AOTAutograd compiles
the backward as a second graph, so the backward of a compiled block is compiled too.

One compiled function serves every block. Blocks are structurally identical and hold no buffers (rotary
angles are recomputed in forward), so block j differs from block 0 only in its parameter values, and
those are passed in as graph inputs, not baked in as constants:
    runtime=fuyou    `flat_block_function(template, layouts)`: takes x and block j's streamed flat weight
                     parts, slices them into views inside the graph and calls the template block (on
                     "meta") through `functional_call`. The backward then returns each part's gradient
                     as one flat tensor.
    runtime=reference `module_block_function()`: takes the block module itself; dynamo lifts its
    and streamed QLoRA parameters as inputs (torch inlines nn modules), so every block reuses the graph
                     compiled for the first. QLoRA's blocks trace whole too: bitsandbytes' Linear4bit
                     through its registered ops (its NF4 tensors become inputs like parameters, so a
                     streamed block's freshly installed weights need no recompile), peft's LoRA layers
                     as ordinary modules.
Each compiles a handful of graphs per run, whatever the number of blocks: grad mode (forward and
recompute without grad; backward with it), autocast on or off, and activation checkpointing on or off
(reference) are guarded on. Shapes are static (`dynamic=False`): a run's micro-batch shape is fixed.

`fullgraph=True`: a block that dynamo cannot trace whole is an error that names `train.compile=false`,
never a silent eager fallback with the slow path it was meant to replace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from fuyou.errors import FuyouError

# Tests on the CPU set "aot_eager" (dynamo and AOTAutograd, no C++ compiler); runs use Inductor.
BACKEND = "inductor"
# Dynamo keeps at most this many graphs per function's code object; every runtime of a process (tests
# build many) adds its own few, so torch's default of 8 would silently send later ones back to eager.
RECOMPILE_LIMIT = 64


class CompiledBlock:
    """A block function compiled with torch.compile; a compiler failure becomes a one-line `FuyouError`.

    Args:
        function: (x_BSD, ...) -> y_BSD, pure in its arguments (keyword flags such as `output_unused`
            are constants to dynamo: one graph per value).
    """

    def __init__(self, function: Callable[..., torch.Tensor]) -> None:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        self.function = function
        self._compiled = torch.compile(function, backend=BACKEND, dynamic=False, fullgraph=True)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        try:
            return self._compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:  # tracing or the backend failed, not the kernels
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise FuyouError(
                f"torch.compile of a transformer block failed ({type(error).__name__}: {first_line}); "
                f"set train.compile=false to run the blocks eagerly"
            ) from error


def flat_block_function(template: nn.Module, layouts: Sequence) -> CompiledBlock:
    """The runtime's block, compiled: (x_BSD, *parts) -> y_BSD.

    Args:
        template: one block of the model (its own parameters are never read; "meta" will do).
        layouts: the `fuyou.runtime.FlatLayout` of each flat part, the same for every block.

    Returns:
        A callable taking x_BSD and one flat tensor per layout (the block's streamed weights, e.g. bf16
        matrices and fp32 vectors), returning the block's output; differentiable in all of them.
        `output_unused=True` (the backward's recompute) skips the last linear's GEMM (Block.forward).
    """

    def run_block(x_BSD: torch.Tensor, *parts: torch.Tensor, output_unused: bool = False) -> torch.Tensor:
        views = {}
        for layout, part in zip(layouts, parts):
            views.update(layout.views(part))
        return functional_call(template, views, (x_BSD,), {"output_unused": output_unused})

    return CompiledBlock(run_block)


def _call_block(block: nn.Module, x_BSD: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    # Checkpointing inside the graph: dynamo turns it into a region the partitioner recomputes in backward.
    return checkpoint(block, x_BSD, use_reentrant=False) if checkpointed else block(x_BSD)


def module_block_function() -> CompiledBlock:
    """The reference trainer's block, compiled: (block, x_BSD, checkpointed) -> y_BSD, for any block."""
    return CompiledBlock(_call_block)
