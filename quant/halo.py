"""HALO: the three GEMMs of every linear layer in FP8 e4m3, with Hadamard rotations against outliers.

After Ashkboos et al., "HALO: Hadamard-Assisted Lower-Precision Optimization for LLMs" (arXiv 2501.02625).
A linear layer Y = X W^T costs three GEMMs per step; HALO runs all three on FP8 operands with one scale per
tensor, and rotates operands by orthogonal Hadamard matrices (`quant.hadamard`) first, so that an outlier
row or column is spread out before the per-tensor scale is chosen.

Legend: T tokens (batch x sequence, flattened), I input features, O output features. H_I, H_T are the
orthogonal Hadamard matrices of orders I and T (H H^T = I). Q(.) is per-tensor FP8 quantization.

Where the rotations go (the paper's levels; in its reference code, IST-DASLab/HALO `qllmt`, these are the
variants that reuse the forward's rotated operands in backward, `HaloFnLevel{1,2}WithQFSDPBackwardXH`):

    GEMM (reduces over)           level 0            level 1                          level 2
    forward  Y  = X W^T   (I)     Q(X) Q(W)^T        Q(X H_I) Q(W H_I)^T              as level 1
    input    dX = dY W    (O)     Q(dY) Q(W)         [Q(dY) Q(W H_I)] H_I^T           H_T [Q(H_T^T dY) Q(W H_I)] H_I^T
    weight   dW = dY^T X  (T)     Q(dY)^T Q(X)       [Q(dY)^T Q(X H_I)] H_I^T         as level 1

Why these are exact before quantization (Q = identity), using only H H^T = I:
    forward: (X H_I)(W H_I)^T = X H_I H_I^T W^T = X W^T. The rotation acts on the reduced axis I and
             cancels inside the GEMM.
    input:   dY (W H_I) H_I^T = dY W. At level 2 also H_T (H_T^T dY)(W H_I) H_I^T = (H_T H_T^T) dY W = dY W.
    weight:  dY^T (X H_I) H_I^T = dY^T X.
In the backward GEMMs H_I acts on an axis that is not reduced, so it survives into the product and is
undone on the output (the trailing H_I^T); likewise H_T, which acts on the token axis of dY, is undone
by the leading H_T. The backward reuses Q(X H_I) and Q(W H_I) from the forward: one FP8 copy of each is
kept for backward (half the bytes of a bf16 X), and no tensor is quantized twice. Level 2 rotates dY
along tokens only for dX, as the paper's level 2 does: rotating it along tokens inside dW (whose reduced
axis is T) would need a token-rotated second FP8 copy of X.

Rotations. By default every H is block-diagonal, I ⊗ H_b with b = 4^k <= 256 (`quant.hadamard.rotate_blocks`,
the `had_size` of HALO's reference code): one bf16 GEMM of K = b per rotation, so a rotation costs about
one read and one write of the tensor. `hadamard_block=None` rotates by the full H_n of the axis instead
(`quant.hadamard.rotate`, several fp32 passes: an ablation, not the fast path). Every identity above holds
for any orthogonal H, so both are exact before quantization.

Numerics. e4m3 keeps 3 mantissa bits (relative rounding error <= 2^-4) and a range of +-448; a tensor is
scaled so that its largest magnitude maps to 448 (current scaling: the amax of this very tensor), or, with
`scaling="delayed"` (`quant.delayed_scaling`), by the amaxes its operand had in the last optimizer steps,
so that the cast need not wait for a reduction over the tensor. On CUDA
the GEMM is `torch._scaled_mm` (FP8 inputs, fp32 accumulation, bf16 or fp32 output; the forward uses
Hopper's fast accumulation, the two backward GEMMs do not, as Transformer Engine does). Elsewhere it is
simulated: the same FP8 values are dequantized and multiplied in fp32 (fp64 for fp64 inputs), which is
what the CPU tests check against float64 math. Under autocast, HaloLinear casts x and W to the autocast
dtype first, as nn.Linear's autocast does, so rotations and quantization read bf16, never fp32.
Because e4m3 is a float format, moderate outliers cost little even at level 0; rotations pay off once a
tensor's dynamic range exceeds e4m3's (~2^17, see the outlier test), and matter more for integer formats
(the reference code's README runs FP8 at level 0 and INT8 at level 2). `quantize=False` keeps every
rotation but skips Q, so tests can prove the rotations are placed and undone right to rounding error.

Layouts (CUDA). FP8 `_scaled_mm` on Hopper takes only A row-major and B column-major, i.e. both operands
with the reduced axis contiguous. The weight gradient reduces over tokens, so it needs X^T and dY^T with
tokens contiguous, and the input gradient needs W^T. The quantizer therefore writes each FP8 tensor in the
layouts its GEMMs need, in the same pass that scales it: the forward keeps Q(X H_I)^T and Q(W H_I)^T for
backward (the same bytes as keeping the row-major copies). On CUDA the quantizer (amax, scale, cast, both
layouts) runs through torch.compile with static shapes, two fused kernels, unless `use_compiled_quantizer(False)`; if the
compiler fails it warns once and falls back to eager torch ops. Inside a block compiled whole (`train.compile`,
fuyou.block_compile) the quantizer is traced into the block's graph instead. With delayed scaling on CUDA
(levels 0-1), `quant.fp8_cast`'s Triton kernel casts what no fusible kernel produces: the weights (read as
fp32 masters), the input of a layer after an opaque kernel (`opaque_input`: the out-projection, after SDPA),
and the output gradients dY that arrive as a graph input or in pieces (the QKV projection's dq, dk, dv, read
in place through `HaloLinear.forward_split`); each in one pass for both layouts with the exact amax. At level 0
a GPT MLP's two HaloLinears run together (`quant.halo_mlp`), the GELU and its derivative computed inside the
kernel's casts.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from quant import delayed_scaling
from quant.hadamard import rotate, rotate_blocks

LEVELS = (0, 1, 2)
SCALINGS = ("current", "delayed")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
# torch._scaled_mm wants every GEMM dimension to be a multiple of 16; others are zero-padded (exact).
SCALED_MM_ALIGN = 16
# Order of the diagonal Hadamard blocks (module docstring, Rotations); None means the full H_n.
HADAMARD_BLOCK = 256

# Whether CUDA tensors are quantized through torch.compile (see use_compiled_quantizer).
_compiler = {"enabled": True, "failed": False, "function": None}
# Whether the GELU MLP's delayed-scaling casts on CUDA run quant.fp8_cast's kernel (see use_fused_cast).
_fused_cast = {"enabled": True, "failed": False, "loaded": False, "cast": None, "transpose": None, "linear_dy": False,
               "split_dy": True, "weights": True, "opaque_x": True, "x_transpose": True}


def use_fused_cast(enabled: bool) -> None:
    """Under delayed scaling on CUDA, run the GPT MLP with its GELU and the GELU's derivative inside
    `quant.fp8_cast`'s Triton casts (`quant.halo_mlp`; enabled, the default), or as two HaloLinears with
    torch-op casts (disabled)."""
    _fused_cast["enabled"] = enabled


def use_kernel_for_linear_dy(enabled: bool) -> None:
    """Whether HaloMatmul's backward casts a single dY (the attention's out-projection) with `quant.fp8_cast`'s
    kernel under delayed scaling (enabled) or with torch ops that Inductor fuses (disabled, the default); the
    GELU MLP's dY and the QKV projection's split dY (`use_kernel_for_split_dy`) take the kernel. Disabled
    measured faster: the out-projection's dY comes out of LayerNorm's backward, whose kernel writes the torch-op
    casts itself, and which grew from 7.6 to 16.7 ms a step when it had to write bf16 for the kernel instead
    (230.4 against 224.4 ms a step; 1.3B shape, batch 8, `benchmarks.diag.halo_step --variants halo0-delayed
    halo0-delayed-lineardy`, H100, fifteenth session)."""
    _fused_cast["linear_dy"] = enabled


def use_kernel_for_split_dy(enabled: bool) -> None:
    """Whether a HaloLinear run through `forward_split` (the attention's QKV projection) casts its dY with
    `quant.fp8_cast`'s kernel under delayed scaling, reading dq, dk and dv where the attention's backward wrote
    them (enabled, the default), or concatenates them for the torch-op casts (disabled)."""
    _fused_cast["split_dy"] = enabled


def use_kernel_for_weights(enabled: bool) -> None:
    """Whether, under delayed scaling on CUDA, every HaloLinear (and the fused GELU MLP) casts its weight with
    `quant.fp8_cast`'s kernel (enabled, the default): the fp32 master weight read once, both FP8 layouts and the
    exact amax written in that pass, the transposed copy kept for backward. With torch ops (disabled) Inductor
    writes the row-major copy in the forward and, rather than keep the transposed one, reads the fp32 weight
    again in the backward to write it, and takes the amax in separate reductions."""
    _fused_cast["weights"] = enabled


def use_kernel_for_opaque_inputs(enabled: bool) -> None:
    """Whether, under delayed scaling on CUDA, a HaloLinear built with `opaque_input` (the attention's output
    projection, whose x comes from the attention kernel, where Inductor has no producer to fuse a cast into)
    casts x with `quant.fp8_cast`'s kernel (enabled, the default): both layouts and the exact amax in one pass,
    the transposed copy kept for backward, where Inductor wrote it by reading x again."""
    _fused_cast["opaque_x"] = enabled


def use_kernel_for_x_transpose(enabled: bool) -> None:
    """Whether, under delayed scaling on CUDA, x cast by torch ops (a LayerNorm's output, whose kernel writes the
    FP8 rows) gets its transposed copy for dW from `quant.fp8_cast.transpose` in the forward (enabled, the
    default), or from Inductor, which recomputed it inside LayerNorm's backward with byte-strided stores."""
    _fused_cast["x_transpose"] = enabled


def _load_fused_cast() -> bool:
    """Imports quant.fp8_cast (and Triton) once; False, with one warning, where Triton is missing."""
    if not (_fused_cast["loaded"] or _fused_cast["failed"]):
        try:
            import quant.fp8_cast
            import quant.halo_mlp  # noqa: F401 - imports quant.halo: load it here, not while tracing
            _fused_cast["cast"], _fused_cast["transpose"] = quant.fp8_cast.cast, quant.fp8_cast.transpose
            _fused_cast["loaded"] = True
        except (ImportError, AttributeError) as error:  # no Triton, or a torch before torch.library.triton_op (2.6)
            warnings.warn(f"quant.fp8_cast needs Triton and torch >= 2.6 ({error}); the GELU MLP casts with torch ops",
                          stacklevel=2)
            _fused_cast["failed"] = True
    return _fused_cast["loaded"]


def fused_cast_ready(x: torch.Tensor) -> bool:
    """Whether `quant.fp8_cast` can cast x: a CUDA tensor, the kernel enabled (use_fused_cast), and Triton
    loaded. Under torch.compile nothing is imported (HaloLinear loads it when built for delayed scaling with
    CUDA present)."""
    if not (x.is_cuda and _fused_cast["enabled"]):
        return False
    return _fused_cast["loaded"] if torch.compiler.is_compiling() else _load_fused_cast()


def kernel_cast():
    """`quant.fp8_cast.cast`, imported once (when the layer was built, on CUDA), not while dynamo traces.

    Callers run it outside any `torch.autocast(enabled=False)` block of a backward: called inside one, in
    a backward that dynamo traces while tracing the forward, it left the rest of the block's forward traced
    with autocast off, so the MLP and the out-projection's weight gradient ran in fp32 (`_scaled_mm` out_dtype
    float32, H100, torch 2.11; `tests/test_quant_fp8_cast.py::test_gpu_compiled_halo_block_gemms_write_bf16`
    checks it). Tests that run the kernel on the CPU load it here, outside any trace."""
    if _fused_cast["cast"] is None:
        from quant.fp8_cast import cast, transpose

        _fused_cast["cast"], _fused_cast["transpose"] = cast, transpose
    return _fused_cast["cast"]


def fp8_transposed(x_op: _Operand) -> _Operand:
    """x^T of an FP8 operand through `quant.fp8_cast.transpose` (loaded as kernel_cast loads the cast)."""
    kernel_cast()
    return _Operand(_fused_cast["transpose"](x_op.values), x_op.scale)


def use_compiled_quantizer(enabled: bool) -> None:
    """Quantize CUDA tensors through torch.compile (enabled, the default) or with eager torch ops.

    Compiled: one reduction kernel (amax) and one pointwise kernel writing every requested layout. Eager:
    the same math in four to five kernels with bf16 temporaries. CPU tensors always take the eager path.
    """
    _compiler["enabled"] = enabled


def compiled_quantizer_failed() -> bool:
    """Whether torch.compile failed here once, so that CUDA quantization now always runs eagerly."""
    return _compiler["failed"]


def _quantize_math(x_RC: torch.Tensor, rows: bool, cols: bool, state_row: torch.Tensor | None = None,
                   delayed: bool = False):
    """(x_fp8 [R, C] or None, x_fp8^T contiguous [C, R] or None, scale) with x ≈ x_fp8 * scale.

    With `state_row` (one operand's column of a HaloLinear's `amax_state`) and current scaling, the amax is
    also recorded; `delayed` takes the scale from that column's history instead, and the caller records the
    amax from the FP8 values once a GEMM has consumed them (`_record`).

    No clamp is needed before the cast: |x| / scale <= 448 up to one rounding, and e4m3fn rounds anything
    below 464 to at most 448 (only values >= 464 would become NaN). The scaling is done in fp32 so that a
    bf16 x is rounded once, straight to e4m3: a bf16 product would round twice, which moved ~2.5% of the
    values by one e4m3 step and made eager (CPU) and compiled (GPU) results differ by ~1.5% per GEMM.
    Compiled, the fp32 product stays in registers and costs nothing; eager, it is one fp32 temporary.
    """
    if delayed:
        scale = delayed_scaling.scale_from_history(state_row)
        x_fp8 = delayed_scaling.cast(x_RC, scale, FP8_DTYPE)
    else:
        # Rows first, then the [R] row maxima: Inductor runs a row reduction near the memory bandwidth, and
        # a whole-tensor one as a split reduction at about a quarter of it (H100, torch 2.11).
        amax = x_RC.abs().amax(dim=-1).amax().float()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        x_fp8 = (x_RC.float() * scale.reciprocal()).to(FP8_DTYPE)
        if state_row is not None:
            delayed_scaling.record_exact(state_row, amax)
    return (x_fp8 if rows else None), (x_fp8.t().contiguous() if cols else None), scale


def _quantize(x_RC: torch.Tensor, rows: bool = True, cols: bool = False, state_row: torch.Tensor | None = None,
              delayed: bool = False):
    if torch.compiler.is_compiling():
        # Inside a compiled block (train.compile): the math joins the block's graph, where Inductor can
        # fuse it into the kernel that produces x_RC; no nested compiled function, no config changes.
        return _quantize_math(x_RC, rows, cols, state_row, delayed)
    if x_RC.is_cuda and _compiler["enabled"] and not _compiler["failed"]:
        if _compiler["function"] is None:
            # Static shapes: with dynamic ones Inductor cannot split the amax reduction across the GPU and
            # the quantizer ran 20-100x slower than eager (H100, torch 2.11). A model has a handful of linear
            # shapes, each compiled once (x, W and dY, in one or two layouts), so allow that many entries.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 128))
            _compiler["function"] = torch.compile(_quantize_math, dynamic=False)
        try:
            return _compiler["function"](x_RC, rows, cols, state_row, delayed)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - any compiler failure: keep training on eager ops
            warnings.warn(f"torch.compile of the HALO quantizer failed, using eager torch ops: {error!r:.300}", stacklevel=2)
            _compiler["failed"] = True
    return _quantize_math(x_RC, rows, cols, state_row, delayed)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 e4m3 quantization: x ≈ x_fp8.float() * scale.

    Args:
        x: any shape and floating dtype.

    Returns:
        (x_fp8 of x's shape in float8_e4m3fn, scale: fp32 scalar tensor = amax(|x|) / 448). An all-zero
        tensor gets scale 1 rather than a division by zero.
    """
    x_fp8, _, scale = _quantize(x, rows=True, cols=False)
    return x_fp8, scale


class _Operand:
    """A GEMM operand: FP8 values with their scale, or (quantize=False) the tensor itself with scale None."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor | None):
        self.values, self.scale = values, scale

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.values.to(dtype)
        return self.values.to(dtype) * self.scale.to(dtype)


def _operands(x_RC: torch.Tensor, quantize: bool, *, rows: bool = True, cols: bool = False,
              state_row: torch.Tensor | None = None, delayed: bool = False):
    """(x [R, C], x^T [C, R]) as operands, each only if asked for; quantized ones share one scale."""
    if not quantize:
        return (_Operand(x_RC, None) if rows else None), (_Operand(x_RC.t(), None) if cols else None)
    x_rows, x_cols, scale = _quantize(x_RC, rows, cols, state_row, delayed)
    return (_Operand(x_rows, scale) if rows else None), (_Operand(x_cols, scale) if cols else None)


def _record(operand: _Operand | None, state_row: torch.Tensor | None, delayed: bool) -> None:
    """Delayed scaling's amax, read back from an FP8 operand. Called after a GEMM consumed the operand: by then
    Inductor has the FP8 tensor in memory and the reduction reads its bytes (1 B an element); called before,
    it recomputes the cast, and the producer behind it, from the producer's inputs."""
    if delayed and operand is not None and operand.scale is not None:
        delayed_scaling.record_from_fp8(state_row, operand.values, operand.scale)


def _pad_to(x_RC: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if x_RC.shape == (rows, cols):
        return x_RC
    # F.pad, fill_ and friends lack FP8 kernels on some devices; pad the bytes (0x00 is +0.0 in e4m3).
    padded = torch.zeros(rows, cols, dtype=torch.uint8, device=x_RC.device)
    padded[: x_RC.shape[0], : x_RC.shape[1]] = x_RC.view(torch.uint8)
    return padded.view(x_RC.dtype)


def _scaled_mm(a_MK: _Operand, b_NK: _Operand, out_dtype: torch.dtype, fast_accum: bool,
               bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """a_MK @ b_NK^T (+ bias_N, in the GEMM's epilogue) on FP8 tensor cores. Both operands come row-major with
    K contiguous (the quantizer wrote them so); `.contiguous()` below is then free, and only a padded
    (unaligned) operand is copied."""
    (m, k), n = a_MK.values.shape, b_NK.values.shape[0]

    def align(size: int) -> int:
        return -(-size // SCALED_MM_ALIGN) * SCALED_MM_ALIGN

    a_values = _pad_to(a_MK.values, align(m), align(k)).contiguous()
    b_values = _pad_to(b_NK.values, align(n), align(k)).contiguous()
    if bias_N is not None and align(n) != n:
        bias_N = torch.cat([bias_N, bias_N.new_zeros(align(n) - n)])
    # _scaled_mm takes A row-major [M, K] and B column-major [K, N]: a contiguous [N, K] seen transposed.
    out_MN = torch._scaled_mm(a_values, b_values.t(), a_MK.scale, b_NK.scale, bias=bias_N, out_dtype=out_dtype,
                              use_fast_accum=fast_accum)
    return out_MN[:m, :n]


def _gemm(a_MK: _Operand, b_NK: _Operand, out_dtype: torch.dtype, *, fast_accum: bool = False,
          bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """a_MK @ b_NK^T (+ bias_N), on FP8 tensor cores when quantized on CUDA, else simulated at high precision.

    The bias is added to the fp32 accumulator before the one rounding to out_dtype: in `_scaled_mm`'s
    epilogue on CUDA (which takes a bf16 bias, and only for a bf16 output), else in the simulation's
    precision. Written as `y + b` after the GEMM, it was a kernel of its own wherever no later op took it in
    (the attention's QKV projection: 3.1 ms a step at batch 8, 1.3B shape; benchmarks/RESULTS.md, fourteenth
    session)."""
    if a_MK.scale is not None and a_MK.values.is_cuda:
        if bias_N is None or out_dtype == torch.bfloat16:
            return _scaled_mm(a_MK, b_NK, out_dtype, fast_accum,
                              None if bias_N is None else bias_N.to(torch.bfloat16))
        return (_scaled_mm(a_MK, b_NK, torch.float32, fast_accum) + bias_N.float()).to(out_dtype)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    out_MN = a_MK.dequantized(compute) @ b_NK.dequantized(compute).t()
    return (out_MN if bias_N is None else out_MN + bias_N.to(compute)).to(out_dtype)


def _rotate(x: torch.Tensor, dim: int, block: int | None, *, inverse: bool = False) -> torch.Tensor:
    """x times H (H^T if inverse) along `dim`: diagonal blocks of order <= `block`, or the full H_n if None."""
    if block is None:
        return rotate(x, dim, inverse=inverse)
    return rotate_blocks(x, dim, max_block=block)  # symmetric and orthogonal: its own inverse


class HaloMatmul(torch.autograd.Function):
    """y_TO = x_TI @ weight_OI^T with HALO's FP8 GEMMs and rotations (table in the module docstring); with
    `split_O`, y's column blocks of those widths as separate outputs (views of y), each with its own gradient."""

    @staticmethod
    def forward(ctx, x_TI, weight_OI, level: int, quantize: bool, out_dtype: torch.dtype, block: int | None,
                amax_state: torch.Tensor | None, delayed: bool, bias_O: torch.Tensor | None,
                split_O: tuple[int, ...] | None, opaque_input: bool):
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rotated = level >= 1
        rows = [None] * 4 if amax_state is None else list(amax_state.unbind(1))  # x, w, dy, dy rotated along tokens
        kernel = delayed and quantize and level < 2 and fused_cast_ready(x_TI)
        kernel_x, kernel_w = kernel and opaque_input and _fused_cast["opaque_x"], kernel and _fused_cast["weights"]
        with torch.autocast(x_TI.device.type, enabled=False):
            # Q(X H_I), and its transpose for dW = dY^T X; Q(W H_I), and its transpose for dX = dY W.
            x_in = _rotate(x_TI, -1, block) if rotated else x_TI
            if kernel_x:  # both layouts in one pass and the exact amax (use_kernel_for_opaque_inputs)
                x_op, x_t_op, _ = _kernel_operands(x_in.contiguous(), amax_state, 0, rows=True, cols=needs_dw,
                                                   colsum=False)
            else:
                transpose = kernel and needs_dw and _fused_cast["x_transpose"]  # use_kernel_for_x_transpose
                x_op, x_t_op = _operands(x_in, quantize, cols=needs_dw and not transpose, state_row=rows[0],
                                         delayed=delayed)
                if transpose:
                    x_t_op = fp8_transposed(x_op)
            # The weight in x's dtype (autocast's), cast here rather than by the caller: no autograd cast node,
            # so dW comes back in the master weight's dtype straight from the GEMM (backward). The kernel reads
            # an unrotated fp32 master weight as it is (use_kernel_for_weights).
            w_in = _rotate(weight_OI.to(x_TI.dtype), -1, block) if rotated else weight_OI
            if kernel_w:
                w_op, w_t_op, _ = _kernel_operands(w_in.contiguous(), amax_state, 1, rows=True, cols=needs_dx,
                                                   colsum=False)
            else:
                w_op, w_t_op = _operands(w_in.to(x_TI.dtype), quantize, cols=needs_dx, state_row=rows[1],
                                         delayed=delayed)
            y_TO = _gemm(x_op, w_op, out_dtype, fast_accum=True, bias_N=bias_O)  # (X H_I)(W H_I)^T = X W^T
            _record(None if kernel_x else x_op, rows[0], delayed)  # the kernel recorded its operands itself
            _record(None if kernel_w else w_op, rows[1], delayed)
        # The state is mutated in place by backward's recording too, so it rides on ctx, not in saved tensors.
        ctx.rows, ctx.delayed, ctx.amax_state = rows, delayed, amax_state
        ctx.bias_dtype = None if bias_O is None else bias_O.dtype
        ctx.level, ctx.quantize, ctx.block = level, quantize, block
        ctx.x_dtype, ctx.weight_dtype = x_TI.dtype, weight_OI.dtype
        ctx.x_scale, ctx.w_scale = x_op.scale, w_op.scale
        ctx.save_for_backward(x_t_op.values if needs_dw else None, w_t_op.values if needs_dx else None)
        return y_TO if split_O is None else y_TO.split(split_O, dim=-1)

    @staticmethod
    def backward(ctx, *dy_parts):
        x_t_values, w_t_values = ctx.saved_tensors
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[8]
        level, quantize, block = ctx.level, ctx.quantize, ctx.block
        dx_TI = dw_OI = db_O = None
        rows, delayed = ctx.rows, ctx.delayed
        split = len(dy_parts) > 1
        # dY's column blocks (dq, dk, dv) in place where the kernel can read them; a row-strided block is fine.
        dy_parts = tuple(part if part.stride(-1) == 1 else part.contiguous() for part in dy_parts)
        fused = (delayed and quantize and level < 2 and fused_cast_ready(dy_parts[0])
                 and (_fused_cast["split_dy"] and _segments_fit(dy_parts) if split else _fused_cast["linear_dy"]))
        if fused:
            # quant.fp8_cast: both layouts in one pass, the bias gradient and the exact amax on the way; outside
            # the autocast block below (kernel_cast says why). Split, it reads dY's blocks where they lie.
            dy_op, dy_t_op, db_O = _kernel_operands(dy_parts if split else dy_parts[0].contiguous(), ctx.amax_state,
                                                    2, rows=needs_dx, cols=needs_dw, colsum=needs_db)
            plain_dy_op = None  # recorded by the kernel
        else:
            dy_TO = (torch.cat(dy_parts, dim=-1) if split else dy_parts[0]).contiguous()
        with torch.autocast(dy_parts[0].device.type, enabled=False):
            # One quantization of dY serves both GEMMs (level 2 rotates it along tokens for dX only).
            if not fused:
                dy_op, dy_t_op = _operands(dy_TO, quantize, rows=needs_dx and level < 2, cols=needs_dw,
                                           state_row=rows[2], delayed=delayed)
                plain_dy_op = dy_op if dy_op is not None else dy_t_op  # Q(dY), before level 2 rotates it for dX
                if needs_db:
                    db_O = dy_TO.sum(0, dtype=torch.promote_types(dy_TO.dtype, torch.float32))
            if needs_dx:
                if level == 2:
                    dy_op, _ = _operands(_rotate(dy_TO, 0, block), quantize, state_row=rows[3], delayed=delayed)  # Q(H_T^T dY)
                dx_TI = _gemm(dy_op, _Operand(w_t_values, ctx.w_scale), ctx.x_dtype)  # [H_T^T] dY W [H_I]
                if level == 2:
                    dx_TI = _rotate(dx_TI, 0, block, inverse=True)  # H_T . : dY W H_I
                if level >= 1:
                    dx_TI = _rotate(dx_TI, -1, block, inverse=True)  # . H_I^T : dY W
            if needs_dw:
                # At level 0 the GEMM writes the master weight's dtype (fp32 under autocast) itself, where a bf16
                # result would take one more pass to become the fp32 gradient; a rotated one is undone in x's dtype.
                dw_OI = _gemm(dy_t_op, _Operand(x_t_values, ctx.x_scale), ctx.x_dtype if level >= 1 else ctx.weight_dtype)
                if level >= 1:
                    dw_OI = _rotate(dw_OI, -1, block, inverse=True).to(ctx.weight_dtype)  # . H_I^T : dY^T X
            _record(plain_dy_op, rows[2], delayed)
            if needs_dx and level == 2:
                _record(dy_op, rows[3], delayed)
        db_O = None if db_O is None else db_O.to(ctx.bias_dtype)
        return dx_TI, dw_OI, None, None, None, None, None, None, db_O, None, None


def _segments_fit(parts: tuple[torch.Tensor, ...]) -> bool:
    """Whether `quant.fp8_cast` reads these column blocks in place: 2-D, at most its MAX_SEGMENTS (3), each a
    multiple of its SEGMENT_ALIGN (16) wide; written out here so that this module never imports Triton."""
    return len(parts) <= 3 and all(part.dim() == 2 and part.shape[1] % 16 == 0 for part in parts)


def _kernel_operands(x_RC, state: torch.Tensor, operand: int, *, rows: bool, cols: bool, colsum: bool):
    """(x, x^T, Σ_r x [C] fp32 or None) from `quant.fp8_cast`'s kernel under delayed scaling: one read of x for
    both FP8 layouts and the column sums, the exact amax recorded into `state`'s column `operand`. x_RC is one
    tensor or its column blocks (`quant.fp8_cast.cast`).

    Used where Inductor has no producer to fuse torch-op casts into. For dY, the gradient a layer receives (the
    backward graph's input, or dq, dk, dv from the attention's backward), those ran as two passes over it (one
    per layout, 126 µs together on [16384, 2048] bf16, H100) plus the amax read back from the FP8 bytes
    (fourteenth session). For the fp32 master weights and the out-projection's x (after SDPA), Inductor wrote
    the transposed copy in the backward by reading the tensor again (fifteenth session)."""
    x_rows, x_cols, scale, colsum_C = kernel_cast()(x_RC, state, operand, rows=rows, cols=cols, colsum=colsum)
    return ((_Operand(x_rows, scale) if rows else None), (_Operand(x_cols, scale) if cols else None),
            (colsum_C if colsum else None))


def halo_matmul(x_TI: torch.Tensor, weight_OI: torch.Tensor, *, level: int, quantize: bool = True,
                out_dtype: torch.dtype | None = None, hadamard_block: int | None = HADAMARD_BLOCK,
                amax_state: torch.Tensor | None = None, delayed: bool = False,
                bias_O: torch.Tensor | None = None, split_O: tuple[int, ...] | None = None,
                opaque_input: bool = False):
    """x_TI @ weight_OI^T (+ bias_O) through HALO; differentiable in all three.

    Args:
        x_TI: [T, I] activations.
        weight_OI: [O, I] weight, on x's device; cast to x's dtype for the GEMMs (fp32 master weights under
            autocast), its gradient returned in its own dtype.
        level: 0, 1 or 2 (see the module docstring).
        quantize: False skips FP8 (rotations stay), for exactness tests and ablations.
        out_dtype: dtype of y; None means x's dtype. dX and dW come back in x's and the weight's dtypes.
        hadamard_block: largest order of the diagonal Hadamard blocks (a power of 4), or None for the
            full Hadamard matrix of each rotated axis.
        amax_state: a `quant.delayed_scaling.new_state` tensor, one column per operand (x, w, dy, dy rotated
            along tokens); every quantization records its amax in its column. None records nothing.
        delayed: scale by the state's history (delayed scaling) instead of each tensor's own amax.
        bias_O: [O], added before y is rounded to `out_dtype` (`_gemm`); its gradient comes back in its dtype.
        split_O: widths summing to O: return y's column blocks of these widths (views of y), whose gradients
            the backward reads in place instead of concatenating them first (`HaloLinear.forward_split`).
        opaque_input: x comes from a kernel Inductor cannot fuse a cast into (use_kernel_for_opaque_inputs).

    Returns:
        y_TO in `out_dtype`, or the tuple of its column blocks with `split_O`.

    Raises:
        ValueError: a level other than 0, 1, 2, or `delayed` without a state.
    """
    if level not in LEVELS:
        raise ValueError(f"HALO level must be one of {LEVELS}, got {level!r}")
    if delayed and amax_state is None:
        raise ValueError("delayed scaling takes its scales from an amax_state; pass one")
    if split_O is not None and sum(split_O) != weight_OI.shape[0]:
        raise ValueError(f"split_O {tuple(split_O)} must sum to the {weight_OI.shape[0]} output features")
    return HaloMatmul.apply(x_TI, weight_OI, level, quantize, out_dtype or x_TI.dtype, hadamard_block,
                            amax_state, delayed, bias_O, None if split_O is None else tuple(split_O), opaque_input)


class HaloLinear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs run through `halo_matmul`.

    A subclass, not a wrapper, as the one exception to composition here: only `forward` changes, the
    parameters and their names stay those of nn.Linear, and code that looks for nn.Linear keeps working
    (`init_parameters`, AdamW grouping, HF export, and peft, which then puts LoRA around it: HALO under LoRA).

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.
        level: HALO level 0, 1 or 2.
        quantize: False keeps the rotations but skips FP8.
        hadamard_block: largest order of the diagonal Hadamard blocks, or None for full rotations.
        scaling: "current" (each tensor's own amax) or "delayed" (the amaxes of the last `amax_history`
            optimizer steps, `quant.delayed_scaling`; call its `end_step(model)` after every step).
        opaque_input: x comes from a kernel Inductor cannot fuse a cast into (`use_kernel_for_opaque_inputs`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, level: int, quantize: bool = True,
                 hadamard_block: int | None = HADAMARD_BLOCK, scaling: str = "current",
                 amax_history: int = delayed_scaling.DEFAULT_HISTORY, opaque_input: bool = False, device=None,
                 dtype=None):
        if level not in LEVELS:
            raise ValueError(f"HALO level must be one of {LEVELS}, got {level!r}")
        if scaling not in SCALINGS:
            raise ValueError(f"HALO scaling must be one of {SCALINGS}, got {scaling!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.level, self.quantize, self.hadamard_block, self.scaling = level, quantize, hadamard_block, scaling
        self.opaque_input = opaque_input
        # Not persistent: scaling statistics are no part of the model's weights or its HF export.
        state = delayed_scaling.new_state(amax_history, self.weight.device) if scaling == "delayed" else None
        self.register_buffer("amax_state", state, persistent=False)
        if scaling == "delayed" and quantize and torch.cuda.is_available():
            _load_fused_cast()  # now, not inside a compiled graph
        self.delayed_active = False  # the first step scales currently, then end_step switches (no history yet)
        self.amax_steps = 0  # optimizer steps recorded: end_step's next history slot

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, level: int, quantize: bool = True,
                    hadamard_block: int | None = HADAMARD_BLOCK, scaling: str = "current",
                    amax_history: int = delayed_scaling.DEFAULT_HISTORY, opaque_input: bool = False) -> HaloLinear:
        """A HaloLinear holding `linear`'s own Parameter objects (no copy), so optimizers that already
        reference them keep updating the layer."""
        with torch.device("meta"):
            halo = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       level=level, quantize=quantize, hadamard_block=hadamard_block, scaling=scaling,
                       amax_history=amax_history, opaque_input=opaque_input)
        halo.weight = linear.weight
        halo.bias = linear.bias
        if scaling == "delayed":
            halo.amax_state = delayed_scaling.new_state(amax_history, linear.weight.device)
        return halo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y[..., O] = x[..., I] W^T + b, with the leading axes of x flattened into tokens T.

        Under autocast x is cast to the autocast dtype first (bf16 on the GPU) and y comes out in it, as with
        nn.Linear; `halo_matmul` casts W to x's dtype, so the rotations and the quantizer read bf16, and
        returns dW in the master weight's dtype (fp32). The bias joins the GEMM (`_gemm`) and its gradient is
        summed in fp32.
        """
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y_TO = self._matmul(x)
        return y_TO.reshape(*x.shape[:-1], self.out_features)  # reshape: a padded _scaled_mm result is a slice

    def forward_split(self, x: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """`self(x).split(sizes, -1)`, with each block's gradient reaching the backward on its own: the attention's
        dq, dk and dv are cast to FP8 where they lie instead of being concatenated first (`halo_matmul`'s
        split_O), which at the 1.3B shape saved a write and a read of the [T, 3D] bf16 dQKV."""
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return tuple(y_TS.reshape(*x.shape[:-1], y_TS.shape[-1]) for y_TS in self._matmul(x, tuple(sizes)))

    def _matmul(self, x: torch.Tensor, split_O: tuple[int, ...] | None = None):
        return halo_matmul(x.reshape(-1, self.in_features), self.weight, level=self.level, quantize=self.quantize,
                           out_dtype=x.dtype, hadamard_block=self.hadamard_block, amax_state=self.amax_state,
                           delayed=self.amax_state is not None and self.delayed_active, bias_O=self.bias,
                           split_O=split_O, opaque_input=self.opaque_input)

    def forward_gelu_mlp(self, up_proj: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """self(gelu_tanh(up_proj(x))) with the GELU computed inside the FP8 casts (`quant.halo_mlp`), for a
        GPT MLP whose down-projection this is; None where that path does not apply."""
        if not self.delayed_active:  # cheap exit first: current scaling, or delayed scaling's first step
            return None
        from quant.halo_mlp import gelu_mlp

        return gelu_mlp(up_proj, self, x)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, level={self.level}, quantize={self.quantize}, "
                f"hadamard_block={self.hadamard_block}, scaling={self.scaling}"
                + (", opaque_input=True" if self.opaque_input else ""))


def apply_halo(model: nn.Module, *, level: int, quantize: bool = True, hadamard_block: int | None = HADAMARD_BLOCK,
               scaling: str = "current", amax_history: int = delayed_scaling.DEFAULT_HISTORY,
               exclude: tuple[str, ...] = ("lm_head",), opaque_inputs: tuple[str, ...] = ("o_proj",)) -> list[str]:
    """Swap every plain nn.Linear of `model` for a HaloLinear in place, except those named in `exclude`.

    The parameters are kept (same objects, same names), so a state dict, an optimizer built before the
    swap, the reference trainer and HF export all work unchanged. Our Transformer's head is `lm_head` (or
    the tied embedding, which is not an nn.Linear), so by default every block linear is swapped and the
    head is not: the head's logits feed the loss directly and HALO leaves it in high precision too.
    Only modules whose type is exactly nn.Linear are swapped: bnb/peft subclasses and existing HaloLinears
    are left alone. Apply HALO before LoRA, so that LoRA's own small A/B layers stay in high precision.

    Args:
        model: any module, e.g. a `fuyou.models.Transformer`.
        level: HALO level 0, 1 or 2.
        quantize: False keeps the rotations but skips FP8.
        hadamard_block: largest order of the diagonal Hadamard blocks, or None for full rotations.
        scaling, amax_history: as HaloLinear's.
        exclude: last components of module names not to swap.
        opaque_inputs: last components of the names of linears whose input comes from a kernel Inductor cannot
            fuse a cast into: our attention's output projection, after SDPA (HaloLinear's `opaque_input`).

    Returns:
        The qualified names of the swapped modules.

    Raises:
        ValueError: a level other than 0, 1, 2, or an unknown scaling.
    """
    if level not in LEVELS:
        raise ValueError(f"HALO level must be one of {LEVELS}, got {level!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"HALO scaling must be one of {SCALINGS}, got {scaling!r}")
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in exclude:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, HaloLinear.from_linear(
            module, level=level, quantize=quantize, hadamard_block=hadamard_block, scaling=scaling,
            amax_history=amax_history, opaque_input=child_name in opaque_inputs))
        swapped.append(name)
    return swapped
