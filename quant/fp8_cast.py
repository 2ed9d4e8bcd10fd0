"""One pass from bf16 (or fp32) to FP8 e4m3 in both GEMM layouts, with the amax recorded: the delayed-scaling
cast that `quant.halo_mlp` runs on the GPT MLP's activation ("gelu") and its gradient ("gelu_backward"), and
that `quant.halo` runs on the weights, the out-projection's input and the output gradients ("none").

Why hand-written. HALO's FP8 GEMMs need each operand in e4m3 twice, row-major [R, C] and transposed [C, R]
(`quant.halo`, Layouts), and delayed scaling needs every tensor's amax for the next steps' scales
(`quant.delayed_scaling`). Written as torch ops, Inductor fuses the cast into the producer's kernel, but
inside the training step it writes the transposed FP8 layout at about half the memory bandwidth (GELU's
backward: 11.4 ms a step with the FP8 copies against 6.3 ms in bf16), and it takes the amaxes in separate
reductions that recompute their producers (29 ms a step at batch 8, GPT-3 1.3B shape; benchmarks/RESULTS.md,
tenth and twelfth sessions). None of our dependencies casts to FP8 in two layouts with a running amax:
torch has no such op, and Transformer Engine and torchao, which do, are not dependencies. Triton ships with
torch's CUDA builds, and `torch.library.triton_op` lets torch.compile place the kernel inside the
compiled step (it is opaque to Inductor's fusion, hence the prologues below).

One launch, one program per tile [BLOCK_R, BLOCK_C] of x [R, C]; an x given as column segments (the
attention's dq, dk, dv, each with its own row stride) takes one launch per segment, each writing its columns
of the outputs:

    s     = MARGIN · max(the operand's history) / 448, or 1 if empty   (delayed_scaling.scale_from_history)
    v     = x                          prologue "none"
          = gelu_tanh(x + b)           prologue "gelu":          x is the up-projection's GEMM output
          = x · gelu_tanh'(u + b)      prologue "gelu_backward": x is dL/d gelu, u the saved GEMM output
    q     = e4m3(clamp(v / s, ±448)), rounded to nearest even → rows [R, C] and/or cols [C, R]
    amax  pending = max(pending, max |v|)    (atomic max into the state's pending row)
    sum   optionally Σ_r v [C] in fp32 (atomic adds): the up-projection's bias gradient, when v = dL/du

The prologues exist because the op is opaque to Inductor: the MLP's GELU and its derivative are computed
here, where the FP8 values are written, instead of in a kernel of their own that writes bf16 for this one
to read (2 + 2 bytes an element of [T, 4D] more, `quant.halo_mlp`).

Amax. The kernel sees v before the clamp, so it records the exact amax even when v saturated, and the next
scale fits it at once; the torch ops (CPU, or CUDA without Triton) can only read it back from the FP8
values and grow the scale MARGIN× a step (`delayed_scaling.record_from_fp8`). The scale depends only on the
history rows, which no kernel writes, so every tile, micro-batch and recompute of a step uses the same one.

`reference(...)` is the same math in torch ops, for the tests. On the CPU the kernel runs under Triton's
interpreter (TRITON_INTERPRET=1, tests only), whose e4m3 rounding is not round-to-nearest-even: the CPU
tests allow one e4m3 step there, and the GPU test wants equal bytes.
"""

from __future__ import annotations

import functools

import torch
import triton

from quant import fp8_cast_kernel
from quant.delayed_scaling import FP8_MAX, MARGIN

FP8_DTYPE = torch.float8_e4m3fn
PROLOGUES = {"none": 0, "gelu": 1, "gelu_backward": 2}
GELU_K0, GELU_K1 = fp8_cast_kernel.GELU_K0.value, fp8_cast_kernel.GELU_K1.value
# (BLOCK_R, BLOCK_C, warps) per prologue: the fastest at [16384, 2048] and [16384, 8192] in two runs of
# `python -m benchmarks.diag.fp8_cast` on the H100 (benchmarks/RESULTS.md, thirteenth session). Alone, "none" ran
# faster at (32, 256, 8) (0.075 against 0.085 ms at [16384, 2048]), but inside the step, where most of its casts
# also sum columns with atomics, its casts took 31.1 against 26.5 ms a step (fifteenth session, halo_step -tile).
TILES = {"none": (128, 64, 4), "gelu": (64, 64, 4), "gelu_backward": (64, 128, 4)}
# x may come as column segments read in place (`cast`), each launched on its own; widths a multiple of 16 keep
# every segment's first output byte 16-byte aligned for Triton's vector stores.
MAX_SEGMENTS, SEGMENT_ALIGN = 3, 16


def _as_parts(x_RC) -> tuple[torch.Tensor, ...]:
    return (x_RC,) if isinstance(x_RC, torch.Tensor) else tuple(x_RC)


def _launch(kernel, parts: tuple[torch.Tensor, ...], state: torch.Tensor, operand: int, rows: bool, cols: bool,
            prologue: str, bias: torch.Tensor | None, saved: torch.Tensor | None, colsum: bool,
            block_r: int, block_c: int, num_warps: int):
    R, C = parts[0].shape[0], sum(part.shape[1] for part in parts)
    device = parts[0].device
    empty = functools.partial(torch.empty, device=device)
    rows_RC = empty((R, C) if rows else (0,), dtype=FP8_DTYPE)
    cols_CR = empty((C, R) if cols else (0,), dtype=FP8_DTYPE)
    scale = empty((), dtype=torch.float32)
    colsum_C = torch.zeros((C,) if colsum else (0,), dtype=torch.float32, device=device)
    history = state.shape[0] - 1
    # One launch per column segment, each writing its columns of the outputs: branching on the segment inside
    # one launch made Triton lose the loads' vectorization, 258 µs against 160 for [16384, 6144] (H100).
    c0 = 0
    for x_RC in parts:
        width = x_RC.shape[1]
        # An absent `saved` or `bias` gets a pointer the kernel never reads: the 4-byte scale, not x, which
        # Inductor took for more inputs and wrote copies of when x was a fused producer's output (fifteenth
        # session).
        kernel[(triton.cdiv(R, block_r), triton.cdiv(width, block_c))](
            x_RC, saved if saved is not None else scale, bias if bias is not None else scale, rows_RC, cols_CR,
            state, scale, colsum_C, R, width, x_RC.stride(0), C, c0, operand, history, state.shape[1],
            PROLOGUE=PROLOGUES[prologue], HAS_BIAS=bias is not None, WRITE_ROWS=rows, WRITE_COLS=cols,
            COLSUM=colsum, HISTORY_BLOCK=triton.next_power_of_2(history), SCALE_PER_AMAX=MARGIN / FP8_MAX,
            LIMIT=FP8_MAX, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
        c0 += width
    return rows_RC, cols_CR, scale, colsum_C


def _check(parts: tuple[torch.Tensor, ...], state: torch.Tensor, operand: int, prologue: str, bias, saved,
           colsum: bool):
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {sorted(PROLOGUES)}, got {prologue!r}")
    if not 1 <= len(parts) <= MAX_SEGMENTS:
        raise ValueError(f"x is one to {MAX_SEGMENTS} column segments, got {len(parts)}")
    x_RC = parts[0]
    for part in parts:
        if part.dim() != 2 or part.stride(1) != 1 or part.shape[0] != x_RC.shape[0] or part.dtype != x_RC.dtype:
            raise ValueError("x must be [R, C] tensors of one dtype and row count, each with contiguous rows, got "
                             f"{[(tuple(p.shape), p.stride(), p.dtype) for p in parts]}")
    if len(parts) > 1 and (prologue != "none" or any(part.shape[1] % SEGMENT_ALIGN for part in parts)):
        raise ValueError(f"column segments take no prologue and must be multiples of {SEGMENT_ALIGN} wide")
    if len(parts) == 1 and prologue != "none" and not x_RC.is_contiguous():
        raise ValueError(f"x must be contiguous for a prologue, got shape {tuple(x_RC.shape)}")
    if state.dtype != torch.float32 or state.dim() != 2 or not state.is_contiguous() or not 0 <= operand < state.shape[1]:
        raise ValueError(f"state must be a contiguous fp32 [history + 1, operands] tensor with column {operand}")
    if (prologue == "gelu_backward") != (saved is not None):
        raise ValueError("the gelu_backward prologue, and only it, takes the saved pre-activation")
    if saved is not None and (saved.shape != x_RC.shape or not saved.is_contiguous()):
        raise ValueError(f"saved must be contiguous and shaped like x {tuple(x_RC.shape)}")
    if bias is not None and (prologue == "none" or bias.shape != (x_RC.shape[1],)):
        raise ValueError("a bias goes with a GELU prologue and has one value per column")
    if colsum and prologue == "gelu":
        raise ValueError("column sums are for gradients (prologue none or gelu_backward)")


def cast_eager(x_RC, state: torch.Tensor, operand: int, *, rows: bool = True, cols: bool = False,
               prologue: str = "none", bias: torch.Tensor | None = None, saved: torch.Tensor | None = None,
               colsum: bool = False, block_r: int | None = None, block_c: int | None = None,
               num_warps: int | None = None):
    """The kernel launched directly (no custom op): for tests (interpreter) and the tile benchmark.

    Returns (rows [R, C] FP8 or empty, cols [C, R] FP8 or empty, scale: fp32 scalar, colsum [C] fp32 or
    empty). Records max |v| into state[history, operand] (the module docstring's table). x_RC as in `cast`.
    """
    parts = _as_parts(x_RC)
    _check(parts, state, operand, prologue, bias, saved, colsum)
    tile = TILES[prologue]
    return _launch(fp8_cast_kernel.cast_kernel, parts, state, operand, rows, cols, prologue, bias, saved, colsum,
                   block_r or tile[0], block_c or tile[1], num_warps or tile[2])


@torch.library.triton_op("fuyou::fp8_cast", mutates_args={"state"})
def _fp8_cast_op(x_RC: torch.Tensor, state: torch.Tensor, operand: int, rows: bool, cols: bool, prologue: str,
                 bias: torch.Tensor | None, saved: torch.Tensor | None, colsum: bool,
                 x1: torch.Tensor | None, x2: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = tuple(part for part in (x_RC, x1, x2) if part is not None)
    return _launch(torch.library.wrap_triton(fp8_cast_kernel.cast_kernel), parts, state, operand, rows, cols,
                   prologue, bias, saved, colsum, *TILES[prologue])


def cast(x_RC, state: torch.Tensor, operand: int, *, rows: bool = True, cols: bool = False,
         prologue: str = "none", bias: torch.Tensor | None = None, saved: torch.Tensor | None = None,
         colsum: bool = False):
    """cast_eager's work as the custom op `fuyou::fp8_cast`, which torch.compile keeps inside a compiled graph.

    Args:
        x_RC: [R, C] with contiguous rows (bf16, or any float dtype the kernel can load) on a CUDA device; or
            up to three such [R, C_i] tensors, read as their concatenation along columns without writing it
            (the attention's dq, dk, dv as the QKV projection's dY), each C_i a multiple of 16, prologue "none".
        state: the HaloLinear's `amax_state` [history + 1, operands] fp32; mutated (the pending row).
        operand: the column of `state` this tensor scales by and records into.
        rows, cols: which FP8 layouts to write.
        prologue: "none", "gelu" or "gelu_backward" (module docstring).
        bias: [C], added to the GELU's input (GELU prologues only).
        saved: [R, C] pre-activation u, for "gelu_backward" only.
        colsum: also return Σ_r v [C] fp32.

    Returns:
        (rows [R, C] or empty, cols [C, R] or empty, scale fp32 scalar with v ≈ q · scale, colsum or empty).
    """
    parts = _as_parts(x_RC)
    _check(parts, state, operand, prologue, bias, saved, colsum)
    x1, x2 = (parts[1:] + (None, None))[:2]
    return _fp8_cast_op(parts[0], state, operand, rows, cols, prologue, bias, saved, colsum, x1, x2)


# (BLOCK_R, BLOCK_C, warps) of the transpose: 128-byte rows in and out.
TRANSPOSE_TILE = (128, 128, 4)


@torch.library.triton_op("fuyou::fp8_transpose", mutates_args=())
def _fp8_transpose_op(x_RC: torch.Tensor) -> torch.Tensor:
    R, C = x_RC.shape
    out_CR = torch.empty((C, R), dtype=x_RC.dtype, device=x_RC.device)
    block_r, block_c, num_warps = TRANSPOSE_TILE
    torch.library.wrap_triton(fp8_cast_kernel.transpose_kernel)[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        x_RC, out_CR, R, C, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return out_CR


def transpose(x_RC: torch.Tensor) -> torch.Tensor:
    """x^T contiguous [C, R] of a contiguous FP8 [R, C], as the custom op `fuyou::fp8_transpose`.

    Why an op of its own: HALO's x (a LayerNorm's output) is cast to FP8 inside Inductor's LayerNorm kernel,
    which rows are its natural order. Asked for the transposed copy too (for dW = dY^T X), Inductor recomputed
    it in the backward inside LayerNorm's backward, a row-reduction kernel, writing single bytes a token apart:
    that kernel took 7.7 ms a step against 5.0 in bf16 (1.3B shape, batch 8, H100; benchmarks/RESULTS.md,
    fifteenth session). An opaque op is neither fused nor recomputed: it transposes the FP8 rows once, in the
    forward, in tiles (1 byte read and 1 written an element), and its output is kept for backward. Measured:
    LayerNorm's backward 4.2 ms a step, the transposes 1.0 ms, the step 212.6 against 223.6 ms (call G)."""
    if x_RC.dim() != 2 or not x_RC.is_contiguous() or x_RC.element_size() != 1:
        raise ValueError(f"transpose takes a contiguous 2-D tensor of 1-byte elements, got {tuple(x_RC.shape)} "
                         f"{x_RC.dtype}")
    return _fp8_transpose_op(x_RC)


def gelu_tanh(u: torch.Tensor) -> torch.Tensor:
    """The "gelu" prologue's v in fp32, written as the kernel computes it."""
    t = torch.tanh(GELU_K0 * (u + GELU_K1 * u * u * u))
    return 0.5 * u * (1.0 + t)


def gelu_tanh_backward(dv: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The "gelu_backward" prologue's v in fp32: dv · gelu_tanh'(u)."""
    t = torch.tanh(GELU_K0 * (u + GELU_K1 * u * u * u))
    return dv * (0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * GELU_K0 * (1.0 + 3.0 * GELU_K1 * u * u))


def reference(x_RC: torch.Tensor, state: torch.Tensor, operand: int, *, prologue: str = "none",
              bias: torch.Tensor | None = None, saved: torch.Tensor | None = None):
    """The kernel's math in torch ops: (q [R, C] FP8, scale, v fp32 [R, C]); records into state like the kernel."""
    x = x_RC.float()
    if prologue == "none":
        v = x
    else:
        u = x if prologue == "gelu" else saved.float()
        if bias is not None:
            u = u + bias.float()
        v = gelu_tanh(u) if prologue == "gelu" else gelu_tanh_backward(x, u)
    past_amax = state[:-1, operand].max()
    scale = torch.where(past_amax > 0, past_amax * (MARGIN / FP8_MAX), torch.ones_like(past_amax))
    q = (v * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    state[-1, operand] = torch.maximum(state[-1, operand], v.abs().max())
    return q, scale, v
