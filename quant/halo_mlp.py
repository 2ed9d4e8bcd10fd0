"""HALO's GPT MLP, down(gelu(up(x))), with the GELU and its derivative computed inside the FP8 casts.

Why. `quant.fp8_cast` is a custom op, opaque to Inductor, so a GELU outside it would be a kernel of its own
that writes bf16 [T, F] (F = 4D) for the cast to read back: 4 bytes an element more in the forward, and again
for GELU's backward, on the block's largest activations. Inside one autograd function the casts take the
up-projection's GEMM output u (bias not yet added) and do the rest in the pass that writes the FP8 copies:

    forward                                           backward (dY [T, D] in)
    Q(x), Q(W_up)             -> u = x W_up^T         Q(dY), db_down = Σ_t dY    -> dW_down = dY^T A
    A = gelu(u + b_up) -> Q(A), Q(W_down)              dA = dY W_down            (bf16 [T, F])
    y = A W_down^T + b_down  (bias in the epilogue)   du = dA · gelu'(u + b_up)  -> Q(du), and db_up = Σ_t du
                                                      dW_up = du^T x, dx = du W_up

Every Q is delayed scaling. Q(A), Q(du) and Q(dY) come from `quant.fp8_cast`'s kernel, which records their
amaxes; dY is the backward graph's input, with no producer to fuse a cast into, where Inductor had cast it
in two passes (one per layout) and read the amax back (`quant.halo._kernel_operands`). Q(x) and the weights are torch ops that Inductor fuses into the kernels producing them (LayerNorm,
the weight's cast), recorded from the FP8 values after the GEMM as in `quant.halo`. Casting x with the kernel
too was measured slower (benchmarks/RESULTS.md, thirteenth session: every operand through the kernel, 252.9
against 237.5 ms a step): it adds a read and a write of a [T, D] tensor that LayerNorm writes anyway. The records
go into the same columns of the two layers' `amax_state` that the unfused path uses (x, w, dy of each), so
a run can switch between them. Only level 0 (the rotations of levels 1-2 would sit between the GELU and the
cast), delayed scaling past its first step, CUDA with Triton, and both linears plain HaloLinears with
trainable weights take this path; `gelu_mlp` returns None otherwise and the MLP runs unfused.
"""

from __future__ import annotations

import torch

from quant import delayed_scaling
from quant.halo import (HaloLinear, _fused_cast, _gemm, _kernel_operands, _Operand, _quantize_math, fp8_transposed,
                        fused_cast_ready, kernel_cast)


def _cast_plain(x_RC: torch.Tensor, state: torch.Tensor, operand: int):
    """(rows, cols, scale) of an operand with no GELU beside it: torch ops, which Inductor fuses into the
    kernel that produces x (LayerNorm, the residual gradient); recorded by `_record_plain` after the GEMM."""
    return _quantize_math(x_RC, True, True, state[:, operand], delayed=True)


def _record_plain(state: torch.Tensor, operand: int, rows_RC: torch.Tensor, scale: torch.Tensor):
    delayed_scaling.record_from_fp8(state[:, operand], rows_RC, scale)


def _cast_weight(weight: torch.Tensor, dtype: torch.dtype, state: torch.Tensor):
    """(rows, cols, scale) of a weight: the fp32 master read by the kernel, which records the exact amax
    (`quant.halo.use_kernel_for_weights`), or its `dtype` copy cast by torch ops, recorded after the GEMM."""
    if _fused_cast["weights"]:
        rows, cols, scale, _ = kernel_cast()(weight, state, 1, rows=True, cols=True)
        return rows, cols, scale
    return _cast_plain(weight.to(dtype), state, 1)


class HaloGeluMlp(torch.autograd.Function):
    """y_TD = gelu(x_TD W_up^T + b_up) W_down^T + b_down (table in the module docstring)."""

    @staticmethod
    def forward(ctx, x_TD, w_up_FD, b_up_F, w_down_DF, b_down_D, state_up, state_down):
        cast = kernel_cast()

        with torch.autocast(x_TD.device.type, enabled=False):
            # The weights are cast here, not by the caller, as in quant.halo.HaloMatmul: the dW GEMMs then write
            # the master weights' dtype themselves.
            if _fused_cast["x_transpose"]:  # quant.halo.use_kernel_for_x_transpose
                x_rows, _, x_scale = _quantize_math(x_TD, True, False, state_up[:, 0], delayed=True)
                x_cols = fp8_transposed(_Operand(x_rows, x_scale)).values
            else:
                x_rows, x_cols, x_scale = _cast_plain(x_TD, state_up, 0)
            wu_rows, wu_cols, wu_scale = _cast_weight(w_up_FD, x_TD.dtype, state_up)
            u_TF = _gemm(_Operand(x_rows, x_scale), _Operand(wu_rows, wu_scale), x_TD.dtype, fast_accum=True)
            _record_plain(state_up, 0, x_rows, x_scale)
            a_rows, a_cols, a_scale, _ = cast(u_TF, state_down, 0, rows=True, cols=True, prologue="gelu", bias=b_up_F)
            wd_rows, wd_cols, wd_scale = _cast_weight(w_down_DF, x_TD.dtype, state_down)
            y_TD = _gemm(_Operand(a_rows, a_scale), _Operand(wd_rows, wd_scale), x_TD.dtype, fast_accum=True,
                         bias_N=b_down_D)
            if not _fused_cast["weights"]:
                _record_plain(state_up, 1, wu_rows, wu_scale)
                _record_plain(state_down, 1, wd_rows, wd_scale)
        ctx.save_for_backward(x_cols, wu_cols, u_TF, b_up_F, a_cols, wd_cols, x_scale, wu_scale, a_scale, wd_scale)
        ctx.states = (state_up, state_down)
        ctx.dtypes = (x_TD.dtype, w_up_FD.dtype, w_down_DF.dtype, None if b_down_D is None else b_down_D.dtype)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        cast = kernel_cast()

        x_cols, wu_cols, u_TF, b_up_F, a_cols, wd_cols, x_scale, wu_scale, a_scale, wd_scale = ctx.saved_tensors
        state_up, state_down = ctx.states
        x_dtype, w_up_dtype, w_down_dtype, b_down_dtype = ctx.dtypes
        # The kernel casts run outside the autocast blocks (quant.halo.kernel_cast says why).
        dy_op, dy_t_op, db_down_D = _kernel_operands(dy_TD.contiguous(), state_down, 2, rows=True, cols=True,
                                                     colsum=b_down_dtype is not None)
        with torch.autocast(dy_TD.device.type, enabled=False):
            dw_down_DF = _gemm(dy_t_op, _Operand(a_cols, a_scale), w_down_dtype)
            da_TF = _gemm(dy_op, _Operand(wd_cols, wd_scale), x_dtype)
        du_rows, du_cols, du_scale, db_up_F = cast(da_TF, state_up, 2, rows=True, cols=True, prologue="gelu_backward",
                                                   saved=u_TF, bias=b_up_F, colsum=b_up_F is not None)
        with torch.autocast(dy_TD.device.type, enabled=False):
            dw_up_FD = _gemm(_Operand(du_cols, du_scale), _Operand(x_cols, x_scale), w_up_dtype)
            dx_TD = _gemm(_Operand(du_rows, du_scale), _Operand(wu_cols, wu_scale), x_dtype)
        db_up_F = None if b_up_F is None else db_up_F.to(b_up_F.dtype)
        db_down_D = None if db_down_D is None else db_down_D.to(b_down_dtype)
        return dx_TD, dw_up_FD, db_up_F, dw_down_DF, db_down_D, None, None


def gelu_mlp(up: torch.nn.Module, down: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """down(gelu_tanh(up(x))) through HaloGeluMlp, or None where it does not apply (module docstring)."""
    linears = (up, down)
    if not all(type(linear) is HaloLinear and linear.level == 0 and linear.quantize and linear.delayed_active
               and linear.amax_state is not None and linear.weight.requires_grad for linear in linears):
        return None
    if not fused_cast_ready(x):
        return None
    if torch.is_autocast_enabled(x.device.type):  # as HaloLinear.forward: the casts read the autocast dtype
        x = x.to(torch.get_autocast_dtype(x.device.type))
    y_TD = HaloGeluMlp.apply(x.reshape(-1, up.in_features).contiguous(), up.weight, up.bias, down.weight, down.bias,
                             up.amax_state, down.amax_state)
    return y_TD.reshape(*x.shape[:-1], down.out_features)
