"""The Triton kernel behind `quant.fp8_cast` (its docstring has the math), alone in a module so that tests can
load it again under Triton's interpreter (TRITON_INTERPRET=1 is read when `triton.jit` decorates)."""

import triton
import triton.language as tl

# Kernels read only constexpr globals.
GELU_K0 = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_K1 = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    # 1 - 2 / (e^{2z} + 1): exact limits ±1 (e^{2z} overflows to inf, or underflows to 0), fp32 throughout.
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def cast_kernel(x_ptr, saved_ptr, bias_ptr, rows_ptr, cols_ptr, state_ptr, scale_ptr, colsum_ptr,
                 R, C, x_stride, out_C, out_c0, operand, history, n_operands,
                 PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ROWS: tl.constexpr,
                 WRITE_COLS: tl.constexpr, COLSUM: tl.constexpr, HISTORY_BLOCK: tl.constexpr,
                 SCALE_PER_AMAX: tl.constexpr, LIMIT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    # The scale from the operand's history: state is [history + 1, n_operands], row `history` is pending.
    h = tl.arange(0, HISTORY_BLOCK)
    past = tl.load(state_ptr + h * n_operands + operand, mask=h < history, other=0.0)
    past_amax = tl.max(past, axis=0)
    scale = tl.where(past_amax > 0, past_amax * SCALE_PER_AMAX, 1.0)
    inverse = 1.0 / scale

    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (r[:, None] < R) & (c[None, :] < C)
    offsets = r[:, None].to(tl.int64) * C + c[None, :]  # saved: contiguous [R, C]
    # x [R, C] has rows `x_stride` apart; it is columns out_c0 .. out_c0 + C of the outputs, which are out_C wide.
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * x_stride + c[None, :], mask=inside, other=0.0).to(tl.float32)
    c_out = out_c0 + c
    if PROLOGUE == 0:
        v = x
    else:
        if PROLOGUE == 1:
            u = x
        else:
            u = tl.load(saved_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u = u + tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
        t = _tanh(GELU_K0 * (u + GELU_K1 * u * u * u))
        if PROLOGUE == 1:
            v = 0.5 * u * (1.0 + t)
        else:  # torch's GeluBackward (tanh): 0.5 (1 + t) + 0.5 u (1 - t²) k0 (1 + 3 k1 u²)
            v = x * (0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * GELU_K0 * (1.0 + 3.0 * GELU_K1 * u * u))
    v = tl.where(inside, v, 0.0)

    tl.atomic_max(state_ptr + history * n_operands + operand, tl.max(tl.max(tl.abs(v), axis=1), axis=0))
    if COLSUM:
        tl.atomic_add(colsum_ptr + c_out, tl.sum(v, axis=0), mask=c < C)
    q = tl.clamp(v * inverse, -LIMIT, LIMIT).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    if WRITE_ROWS:
        tl.store(rows_ptr + r[:, None].to(tl.int64) * out_C + c_out[None, :], q, mask=inside)
    if WRITE_COLS:
        # Stored transposed, tokens contiguous: Triton stages the tile through shared memory for this.
        tl.store(cols_ptr + c_out[:, None].to(tl.int64) * R + r[None, :], tl.trans(q), mask=tl.trans(inside))
    if (pid_r == 0) & (pid_c == 0):
        tl.store(scale_ptr, scale)


@triton.jit
def transpose_kernel(x_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out [C, R] = x [R, C]^T, bytes as they are (FP8 values keep their codes)."""
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (r[:, None] < R) & (c[None, :] < C)
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * C + c[None, :], mask=inside)
    tl.store(out_ptr + c[:, None].to(tl.int64) * R + r[None, :], tl.trans(x), mask=tl.trans(inside))
