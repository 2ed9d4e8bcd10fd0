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

Numerics. e4m3 keeps 3 mantissa bits (relative rounding error <= 2^-4) and a range of +-448; a tensor is
scaled so that its largest magnitude maps to 448. On CUDA the GEMM is `torch._scaled_mm` (FP8 inputs,
fp32 accumulation, bf16 or fp32 output). Elsewhere it is simulated: the same FP8 values are dequantized
and multiplied in fp32 (fp64 for fp64 inputs), which is what the CPU tests check against float64 math.
Because e4m3 is a float format, moderate outliers cost little even at level 0; rotations pay off once a
tensor's dynamic range exceeds e4m3's (~2^17, see the outlier test), and matter more for integer formats
(the reference code's README runs FP8 at level 0 and INT8 at level 2). `quantize=False` keeps every
rotation but skips Q, so tests can prove the rotations are placed and undone right to rounding error.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.hadamard import rotate

LEVELS = (0, 1, 2)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
# torch._scaled_mm wants every GEMM dimension to be a multiple of 16; others are zero-padded (exact).
SCALED_MM_ALIGN = 16


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 e4m3 quantization: x ≈ x_fp8.float() * scale.

    Args:
        x: any shape and floating dtype.

    Returns:
        (x_fp8 of x's shape in float8_e4m3fn, scale: fp32 scalar tensor = amax(|x|) / 448). An all-zero
        tensor gets scale 1 rather than a division by zero.
    """
    amax = x.detach().abs().amax().float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # Clamp first: e4m3fn has no infinity, and a value rounding past 448 would become NaN.
    x_fp8 = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8, scale


class _Operand:
    """A GEMM operand: FP8 values with their scale, or (quantize=False) the tensor itself with scale None."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor | None):
        self.values, self.scale = values, scale

    @classmethod
    def of(cls, x: torch.Tensor, quantize: bool) -> _Operand:
        return cls(*quantize_fp8(x)) if quantize else cls(x, None)

    def t(self) -> _Operand:
        return _Operand(self.values.t(), self.scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.values.to(dtype)
        return self.values.to(dtype) * self.scale.to(dtype)


def _pad_to(x_RC: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if x_RC.shape == (rows, cols):
        return x_RC
    # F.pad has no FP8 kernel; pad through a zero buffer instead.
    padded = x_RC.new_zeros(rows, cols)
    padded[: x_RC.shape[0], : x_RC.shape[1]] = x_RC
    return padded


def _scaled_mm(a: _Operand, b_NK: _Operand, out_dtype: torch.dtype) -> torch.Tensor:
    """a_MK @ b_NK^T on FP8 tensor cores (CUDA only)."""
    (m, k), n = a.values.shape, b_NK.values.shape[0]
    align = lambda size: -(-size // SCALED_MM_ALIGN) * SCALED_MM_ALIGN  # noqa: E731
    # _scaled_mm takes A row-major [M, K] and B column-major [K, N]: a contiguous [N, K] seen transposed.
    a_MK = _pad_to(a.values, align(m), align(k)).contiguous()
    b_NK_values = _pad_to(b_NK.values, align(n), align(k)).contiguous()
    out_MN = torch._scaled_mm(a_MK, b_NK_values.t(), a.scale, b_NK.scale, out_dtype=out_dtype)
    return out_MN[:m, :n]


def _gemm(a_MK: _Operand, b_NK: _Operand, out_dtype: torch.dtype) -> torch.Tensor:
    """a_MK @ b_NK^T, on FP8 tensor cores when quantized on CUDA, else simulated at high precision."""
    if a_MK.scale is not None and a_MK.values.is_cuda:
        return _scaled_mm(a_MK, b_NK, out_dtype)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    return (a_MK.dequantized(compute) @ b_NK.dequantized(compute).t()).to(out_dtype)


class HaloMatmul(torch.autograd.Function):
    """y_TO = x_TI @ weight_OI^T with HALO's FP8 GEMMs and rotations (table in the module docstring)."""

    @staticmethod
    def forward(ctx, x_TI, weight_OI, level: int, quantize: bool, out_dtype: torch.dtype):
        with torch.autocast(x_TI.device.type, enabled=False):
            rotated = level >= 1
            x_op = _Operand.of(rotate(x_TI, -1) if rotated else x_TI, quantize)  # Q(X H_I)
            w_op = _Operand.of(rotate(weight_OI, -1) if rotated else weight_OI, quantize)  # Q(W H_I)
            y_TO = _gemm(x_op, w_op, out_dtype)  # (X H_I)(W H_I)^T = X W^T
        ctx.level, ctx.quantize = level, quantize
        ctx.x_dtype, ctx.weight_dtype = x_TI.dtype, weight_OI.dtype
        ctx.x_op_scale, ctx.w_op_scale = x_op.scale, w_op.scale
        ctx.save_for_backward(x_op.values, w_op.values)
        return y_TO

    @staticmethod
    def backward(ctx, dy_TO):
        x_values, w_values = ctx.saved_tensors
        x_op, w_op = _Operand(x_values, ctx.x_op_scale), _Operand(w_values, ctx.w_op_scale)
        rotated = ctx.level >= 1
        dx_TI = dw_OI = None
        with torch.autocast(dy_TO.device.type, enabled=False):
            dy_op = _Operand.of(dy_TO, ctx.quantize)
            if ctx.needs_input_grad[0]:
                if ctx.level == 2:
                    dy_rot_op = _Operand.of(rotate(dy_TO, 0), ctx.quantize)  # Q(H_T^T dY)
                    dx_TI = _gemm(dy_rot_op, w_op.t(), ctx.x_dtype)  # H_T^T dY W H_I
                    dx_TI = rotate(dx_TI, 0, inverse=True)  # H_T . : dY W H_I
                else:
                    dx_TI = _gemm(dy_op, w_op.t(), ctx.x_dtype)  # dY W H_I (level 0: dY W)
                if rotated:
                    dx_TI = rotate(dx_TI, -1, inverse=True)  # . H_I^T : dY W
            if ctx.needs_input_grad[1]:
                dw_OI = _gemm(dy_op.t(), x_op.t(), ctx.weight_dtype)  # dY^T X H_I (level 0: dY^T X)
                if rotated:
                    dw_OI = rotate(dw_OI, -1, inverse=True)  # . H_I^T : dY^T X
        return dx_TI, dw_OI, None, None, None


def halo_matmul(x_TI: torch.Tensor, weight_OI: torch.Tensor, *, level: int, quantize: bool = True,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x_TI @ weight_OI^T through HALO; differentiable in both arguments.

    Args:
        x_TI: [T, I] activations.
        weight_OI: [O, I] weight, on x's device.
        level: 0, 1 or 2 (see the module docstring).
        quantize: False skips FP8 (rotations stay), for exactness tests and ablations.
        out_dtype: dtype of y; None means x's dtype. dX and dW come back in x's and the weight's dtypes.

    Returns:
        y_TO in `out_dtype`.

    Raises:
        ValueError: a level other than 0, 1, 2.
    """
    if level not in LEVELS:
        raise ValueError(f"HALO level must be one of {LEVELS}, got {level!r}")
    return HaloMatmul.apply(x_TI, weight_OI, level, quantize, out_dtype or x_TI.dtype)


class HaloLinear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs run through `halo_matmul`.

    A subclass, not a wrapper, as the one exception to composition here: only `forward` changes, the
    parameters and their names stay those of nn.Linear, and code that looks for nn.Linear keeps working
    (`init_parameters`, AdamW grouping, HF export, and peft, which then puts LoRA around it: HALO under LoRA).

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.
        level: HALO level 0, 1 or 2.
        quantize: False keeps the rotations but skips FP8.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, level: int, quantize: bool = True,
                 device=None, dtype=None):
        if level not in LEVELS:
            raise ValueError(f"HALO level must be one of {LEVELS}, got {level!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.level, self.quantize = level, quantize

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, level: int, quantize: bool = True) -> HaloLinear:
        """A HaloLinear holding `linear`'s own Parameter objects (no copy), so optimizers that already
        reference them keep updating the layer."""
        with torch.device("meta"):
            halo = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       level=level, quantize=quantize)
        halo.weight = linear.weight
        halo.bias = linear.bias
        return halo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y[..., O] = x[..., I] W^T + b, with the leading axes of x flattened into tokens T.

        Under autocast y comes out in the autocast dtype (bf16 on the GPU), as nn.Linear's would.
        """
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        y_TO = halo_matmul(x.reshape(-1, self.in_features), self.weight, level=self.level,
                           quantize=self.quantize, out_dtype=out_dtype)
        y = y_TO.reshape(*x.shape[:-1], self.out_features)  # reshape: a padded _scaled_mm result is a slice
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, level={self.level}, quantize={self.quantize}"


def apply_halo(model: nn.Module, *, level: int, quantize: bool = True,
               exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
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
        exclude: last components of module names not to swap.

    Returns:
        The qualified names of the swapped modules.

    Raises:
        ValueError: a level other than 0, 1, 2.
    """
    if level not in LEVELS:
        raise ValueError(f"HALO level must be one of {LEVELS}, got {level!r}")
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in exclude:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, HaloLinear.from_linear(module, level=level, quantize=quantize))
        swapped.append(name)
    return swapped
