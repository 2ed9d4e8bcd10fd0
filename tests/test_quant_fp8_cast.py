"""quant.fp8_cast: the Triton cast (bf16 -> FP8 in both layouts, amax recorded) against its torch reference.

On the CPU the kernel runs under Triton's interpreter. Its float-to-e4m3 conversion truncates and carries
no rounding into the exponent, unlike the GPU's round-to-nearest-even; the `interpreted` fixture replaces
that one conversion with torch's (which rounds as the GPU does), so these tests can want equal bytes.
On the GPU machine the interpreter tests skip and the `gpu` ones run the compiled kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import quant.fp8_cast_kernel  # noqa: E402
from quant import fp8_cast  # noqa: E402
from quant.delayed_scaling import FP8_MAX, MARGIN  # noqa: E402


@pytest.fixture
def interpreted(monkeypatch):
    """The kernel under Triton's interpreter (tests/conftest.py chooses it where there is no CUDA), with
    torch's e4m3 rounding in place of the interpreter's."""
    from triton.runtime import interpreter

    import triton.language as tl

    if not isinstance(quant.fp8_cast_kernel.cast_kernel, interpreter.InterpretedFunction):
        pytest.skip("Triton compiles for the GPU here (TRITON_INTERPRET unset); the GPU tests cover the kernel")
    convert = interpreter._convert_float

    def torch_rounding(values, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype == tl.float32:
            fp32 = torch.from_numpy(np.ascontiguousarray(values).view(np.float32))
            return fp32.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return convert(values, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", torch_rounding)


def _ordinal(q: torch.Tensor) -> torch.Tensor:
    """e4m3 codes as integers in value order (+0 and -0 both 0), so adjacent values differ by 1."""
    code = q.view(torch.uint8).int()
    return torch.where(code >= 128, -(code - 128), code)


def _state(history: int, past: list[float], operand: int = 2) -> torch.Tensor:
    state = torch.zeros(history + 1, 4)
    state[: len(past), operand] = torch.tensor(past)
    return state


def _inputs(prologue: str, R: int = 100, C: int = 70, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(R, C, generator=generator) * 3).bfloat16()
    saved = torch.randn(R, C, generator=generator).bfloat16() if prologue == "gelu_backward" else None
    bias = torch.randn(C, generator=generator) if prologue != "none" else None
    return x, saved, bias


@pytest.mark.parametrize("prologue", ["none", "gelu", "gelu_backward"])
def test_cast_matches_reference(interpreted, prologue):
    x, saved, bias = _inputs(prologue)
    state, expected_state = _state(4, [1.0, 5.0, 2.0, 0.0]), _state(4, [1.0, 5.0, 2.0, 0.0])
    rows, cols, scale, colsum = fp8_cast.cast_eager(
        x, state, 2, rows=True, cols=True, prologue=prologue, bias=bias, saved=saved,
        colsum=prologue != "gelu", block_r=32, block_c=32, num_warps=4)  # 100 x 70 leaves partial tiles
    q, expected_scale, v = fp8_cast.reference(x, expected_state, 2, prologue=prologue, bias=bias, saved=saved)

    assert scale.item() == expected_scale.item() == pytest.approx(5.0 * MARGIN / FP8_MAX, rel=1e-7)
    assert torch.equal(cols, rows.t())  # same bytes, transposed
    if prologue == "none":
        assert torch.equal(rows.view(torch.uint8), q.view(torch.uint8))
        assert state[-1, 2] == expected_state[-1, 2] == x.float().abs().max()
    else:
        # The kernel's tanh is 1 - 2 / (e^2z + 1) in numpy fp32, torch.tanh differs in the last bits: a value
        # on an e4m3 rounding boundary may land one step away, nothing more.
        differ = rows.view(torch.uint8) != q.view(torch.uint8)
        assert differ.float().mean() < 0.01
        assert (_ordinal(rows) - _ordinal(q)).abs().max() <= 1
        assert state[-1, 2].item() == pytest.approx(expected_state[-1, 2].item(), rel=1e-5)
    assert (q.float().abs() <= FP8_MAX).all() and (q.float().abs() == FP8_MAX).any()  # 5 · 2 < 12: saturated
    assert state[-1, 2] > 5.0 * MARGIN  # the exact amax, past the clamp, so the next scale fits it
    assert torch.equal(state[:-1], expected_state[:-1])  # the history is only read
    if prologue == "gelu":
        assert colsum.numel() == 0
    else:
        torch.testing.assert_close(colsum, v.sum(0), rtol=1e-5, atol=1e-4)


def test_one_layout_empty_history_and_pending_max(interpreted):
    x, _, _ = _inputs("none", R=48, C=96)
    state = _state(16, [])
    state[-1, 0] = 1e6  # pending already holds a larger amax from an earlier micro-batch: kept
    rows, cols, scale, colsum = fp8_cast.cast_eager(x, state, 0, rows=False, cols=True, block_r=16, block_c=64,
                                                   num_warps=4)
    assert rows.numel() == 0 and colsum.numel() == 0 and scale.item() == 1.0  # no history: scale 1
    assert torch.equal(cols.view(torch.uint8), x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).t()
                       .contiguous().view(torch.uint8))
    assert state[-1, 0] == 1e6
    state[-1, 0] = 0.0
    fp8_cast.cast_eager(x, state, 0, block_r=16, block_c=64, num_warps=4)
    assert state[-1, 0] == x.float().abs().max()


def _segments(R: int, widths: tuple[int, ...], seed: int = 1):
    """Column segments as the attention's dq, dk, dv reach the QKV projection: the first two slices of one wider
    tensor (row stride past their width), the last a tensor of its own."""
    generator = torch.Generator().manual_seed(seed)
    wide = (torch.randn(R, widths[0] + widths[1] + 8, generator=generator) * 3).bfloat16()
    last = (torch.randn(R, widths[2], generator=generator) * 3).bfloat16()
    return wide[:, : widths[0]], wide[:, widths[0]: widths[0] + widths[1]], last


def test_column_segments_cast_as_their_concatenation(interpreted):
    parts = _segments(40, (32, 16, 48))
    state, expected_state = _state(4, [2.0, 9.0]), _state(4, [2.0, 9.0])
    # One launch per segment, each narrower than BLOCK_C 64 or not a multiple of it, 40 rows in tiles of 16.
    rows, cols, scale, colsum = fp8_cast.cast_eager(parts, state, 2, rows=True, cols=True, colsum=True,
                                                   block_r=16, block_c=64, num_warps=4)
    q, expected_scale, v = fp8_cast.reference(torch.cat(parts, dim=1), expected_state, 2)
    assert rows.shape == (40, 96) and cols.shape == (96, 40) and scale.item() == expected_scale.item()
    assert torch.equal(rows.view(torch.uint8), q.view(torch.uint8)) and torch.equal(cols, rows.t())
    assert state[-1, 2] == expected_state[-1, 2]
    torch.testing.assert_close(colsum, v.sum(0), rtol=1e-5, atol=1e-4)


def test_transpose_keeps_the_bytes(interpreted):
    x = (torch.randn(100, 70) * 3).to(torch.float8_e4m3fn)  # partial tiles both ways
    assert torch.equal(fp8_cast.transpose(x).view(torch.uint8), x.t().contiguous().view(torch.uint8))
    with pytest.raises(ValueError, match="1-byte"):
        fp8_cast.transpose(torch.zeros(4, 4))


@pytest.mark.parametrize("change, message", [
    ({"prologue": "relu"}, "prologue must be one of"),
    ({"x": torch.zeros(4, 6).t()}, "contiguous"),
    ({"state": torch.zeros(5, 4, dtype=torch.float64)}, "fp32"),
    ({"operand": 4}, "column 4"),
    ({"prologue": "gelu_backward"}, "saved pre-activation"),
    ({"saved": torch.zeros(6, 4)}, "saved pre-activation"),
    ({"prologue": "gelu", "bias": torch.zeros(5)}, "one value per column"),
    ({"prologue": "gelu", "colsum": True}, "column sums"),
    ({"x": (torch.zeros(6, 16), torch.zeros(6, 8))}, "multiples of 16"),
    ({"x": (torch.zeros(6, 16), torch.zeros(6, 16)), "prologue": "gelu", "bias": torch.zeros(16)}, "no prologue"),
    ({"x": (torch.zeros(6, 16), torch.zeros(5, 16))}, "row count"),
    ({"x": (torch.zeros(6, 16),) * 4}, "one to 3 column segments"),
])
def test_bad_arguments_are_named(change, message):
    arguments = {"x": torch.zeros(6, 4), "state": torch.zeros(5, 4), "operand": 0, "prologue": "none",
                 "bias": None, "saved": None, "colsum": False} | change
    x, state, operand = arguments.pop("x"), arguments.pop("state"), arguments.pop("operand")
    with pytest.raises(ValueError, match=message):
        fp8_cast.cast_eager(x, state, operand, **arguments)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prologue", ["none", "gelu", "gelu_backward"])
def test_gpu_op_matches_reference_eager_and_compiled(prologue):
    x, saved, bias = (t.cuda() if t is not None else None for t in _inputs(prologue, R=1000, C=640))
    past = [1.0, 5.0, 2.0, 0.0]

    def run(state):
        rows, cols, scale, colsum = fp8_cast.cast(x, state, 2, rows=True, cols=True, prologue=prologue, bias=bias,
                                                  saved=saved, colsum=prologue != "gelu")
        return rows.view(torch.uint8), cols.view(torch.uint8), scale, colsum

    expected_state = _state(4, past).cuda()
    q, expected_scale, v = fp8_cast.reference(x, expected_state, 2, prologue=prologue, bias=bias, saved=saved)
    for runner in (run, torch.compile(run, fullgraph=True)):
        state = _state(4, past).cuda()
        rows, cols, scale, colsum = runner(state)
        assert torch.equal(cols, rows.t()) and scale.item() == expected_scale.item()
        differ = rows != q.view(torch.uint8)
        if prologue == "none":  # the GPU's cvt.rn.satfinite rounds as torch does
            assert not differ.any()
            assert state[-1, 2] == expected_state[-1, 2]
        else:  # tanh from exp against torch's tanhf
            assert differ.float().mean() < 1e-3
            assert (_ordinal(rows.view(torch.float8_e4m3fn)) - _ordinal(q)).abs().max() <= 1
            assert state[-1, 2].item() == pytest.approx(expected_state[-1, 2].item(), rel=1e-5)
        if prologue != "gelu":
            torch.testing.assert_close(colsum, v.sum(0), rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_column_segments_eager_and_compiled():
    parts = tuple(part.cuda() for part in _segments(1000, (256, 128, 128)))
    expected_state = _state(4, [2.0, 9.0]).cuda()
    q, expected_scale, v = fp8_cast.reference(torch.cat(parts, dim=1), expected_state, 2)

    def run(state):
        rows, cols, scale, colsum = fp8_cast.cast(parts, state, 2, rows=True, cols=True, colsum=True)
        return rows.view(torch.uint8), cols.view(torch.uint8), scale, colsum

    for runner in (run, torch.compile(run, fullgraph=True)):
        state = _state(4, [2.0, 9.0]).cuda()
        rows, cols, scale, colsum = runner(state)
        assert torch.equal(rows, q.view(torch.uint8)) and torch.equal(cols, rows.t())
        assert scale.item() == expected_scale.item() and state[-1, 2] == expected_state[-1, 2]
        torch.testing.assert_close(colsum, v.sum(0), rtol=1e-4, atol=1e-3)


# --- quant.halo_mlp on the fused casts, on the CPU through the interpreter.

@pytest.fixture
def fused_on_cpu(interpreted, monkeypatch):
    """quant.halo_mlp casts CPU tensors through the (interpreted) kernel, as it does CUDA ones."""
    import quant.halo

    monkeypatch.setattr(quant.halo, "fused_cast_ready", lambda x: True)
    import quant.halo_mlp

    monkeypatch.setattr(quant.halo_mlp, "fused_cast_ready", lambda x: True)


def _mlp_pair():
    """Two equal HALO GPT MLPs after one step of current scaling (their histories are that step's amaxes)."""
    from fuyou.models.transformer import GeluMlp, TransformerConfig
    from quant import delayed_scaling
    from quant.halo import apply_halo

    config = TransformerConfig(family="gpt", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4,
                               intermediate_size=256, max_seq_len=16)
    mlps = []
    for _ in range(2):
        torch.manual_seed(0)
        mlp = GeluMlp(config)
        apply_halo(mlp, level=0, scaling="delayed", amax_history=4)
        x = torch.randn(2, 24, 64)
        mlp(x).backward(torch.randn(2, 24, 64) * 1e-3)  # the first step scales currently, unfused
        delayed_scaling.end_step(mlp)
        mlp.zero_grad()
        mlps.append(mlp)
    return mlps


def test_gelu_mlp_fused_matches_unfused(fused_on_cpu, monkeypatch):
    import quant.halo
    import quant.halo_mlp

    fused, plain = _mlp_pair()
    assert torch.equal(fused.up_proj.amax_state, plain.up_proj.amax_state)
    x = torch.randn(2, 24, 64) * 1.5  # 1.5x the amaxes of the first step: within the 2x headroom
    calls = []
    monkeypatch.setattr(quant.halo_mlp.HaloGeluMlp, "apply", lambda *a, apply=quant.halo_mlp.HaloGeluMlp.apply:
                        calls.append(1) or apply(*a))
    x_fused, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fused = fused(x_fused)
    assert calls == [1]  # the MLP took the fused path
    dy = torch.randn_like(y_fused) * 1e-3
    y_fused.backward(dy)
    for module in (quant.halo, quant.halo_mlp):
        monkeypatch.setattr(module, "fused_cast_ready", lambda x: False)
    y_plain = plain(x_plain)
    assert calls == [1]  # and this one did not
    y_plain.backward(dy)
    # The GELU runs in fp32 in both, from the same u (bias added in the kernel, or before it): e4m3 codes of A
    # and du differ by a step only where tanh's last bit decides the rounding.
    torch.testing.assert_close(y_fused, y_plain, rtol=0.02, atol=2e-3)
    torch.testing.assert_close(x_fused.grad, x_plain.grad, rtol=0.02, atol=2e-5)
    for name in ("up_proj", "down_proj"):
        f, p = getattr(fused, name), getattr(plain, name)
        torch.testing.assert_close(f.weight.grad, p.weight.grad, rtol=0.02, atol=2e-5)
        torch.testing.assert_close(f.bias.grad, p.bias.grad, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(f.amax_state[-1], p.amax_state[-1], rtol=2 ** -4, atol=0)
    # And against float64 math without FP8: four e4m3 operands over two GEMMs, each rounded by up to 2^-4.
    weights = {n: getattr(fused, n) for n in ("up_proj", "down_proj")}
    u = x.double() @ weights["up_proj"].weight.double().t() + weights["up_proj"].bias.double()
    y64 = torch.nn.functional.gelu(u, approximate="tanh") @ weights["down_proj"].weight.double().t() + weights["down_proj"].bias.double()
    assert ((y_fused.double() - y64).norm() / y64.norm()) < 0.08


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("level", [0, 1])
def test_halo_linear_dy_through_the_kernel_matches_torch_ops(fused_on_cpu, monkeypatch, level, split):
    """quant.halo's backward casts dY with the kernel under delayed scaling (levels 0-1): both layouts, the
    bias gradient as the kernel's column sums, the exact amax; against the torch-op casts of the same dY.
    `split` runs the layer through forward_split, whose backward hands the kernel dY's three column blocks
    as they arrive (views with dY's row stride), and the torch ops their concatenation."""
    import quant.halo
    from quant import delayed_scaling
    from quant.halo import HaloLinear

    monkeypatch.setitem(quant.halo._fused_cast, "linear_dy", True)  # off by default (use_kernel_for_linear_dy)
    monkeypatch.setitem(quant.halo._fused_cast, "weights", False)  # dY alone here; the forward's casts below
    kernel_inputs = []
    monkeypatch.setattr(quant.halo, "_kernel_operands", lambda x, *a, original=quant.halo._kernel_operands, **k:
                        kernel_inputs.append(x) or original(x, *a, **k))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(quant.halo, "fused_cast_ready", lambda x, fused=fused: fused)
        torch.manual_seed(0)
        layer = HaloLinear(64, 48, level=level, scaling="delayed", amax_history=4)
        x0, dy0 = torch.randn(40, 64), torch.randn(40, 48) * 1e-3
        layer(x0).backward(dy0)  # the first step scales currently
        delayed_scaling.end_step(layer)
        layer.zero_grad()
        x = (x0 * 1.3).requires_grad_()
        if split:  # within the 2x headroom: nothing saturates
            torch.autograd.backward(layer.forward_split(x, (16, 16, 16)), (dy0 * 1.5).split(16, dim=-1))
        else:
            layer(x).backward(dy0 * 1.5)
        results.append((x.grad, layer.weight.grad, layer.bias.grad, layer.amax_state[-1].clone()))
    assert len(kernel_inputs) == 1 and isinstance(kernel_inputs[0], tuple) == split  # the blocks, not their cat
    (dx_k, dw_k, db_k, pending_k), (dx_t, dw_t, db_t, pending_t) = results
    # Same scale, same e4m3 rounding of dY: the GEMMs agree to their fp32 sums' order.
    torch.testing.assert_close(dx_k, dx_t, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(dw_k, dw_t, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(db_k, db_t, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(db_k, (dy0 * 1.5).sum(0), rtol=1e-5, atol=1e-9)
    assert pending_k[2] == (dy0 * 1.5).abs().max()  # the kernel's amax is exact; the read-back one is rounded
    torch.testing.assert_close(pending_k[2], pending_t[2], rtol=2 ** -4, atol=0)


def test_gelu_mlp_fused_only_where_it_applies(fused_on_cpu):
    from quant.halo_mlp import gelu_mlp

    fused, _ = _mlp_pair()
    x = torch.randn(4, 64)
    assert gelu_mlp(fused.up_proj, fused.down_proj, x) is not None
    fused.up_proj.delayed_active = False  # first step: current scaling
    assert gelu_mlp(fused.up_proj, fused.down_proj, x) is None
    fused.up_proj.delayed_active = True
    fused.down_proj.level = 1  # rotations between the GELU and the cast
    assert gelu_mlp(fused.up_proj, fused.down_proj, x) is None
    fused.down_proj.level = 0
    fused.up_proj.weight.requires_grad_(False)
    assert gelu_mlp(fused.up_proj, fused.down_proj, x) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gelu_mlp_fused_compiled_matches_unfused():
    """On CUDA, under bf16 autocast and torch.compile: the fused MLP (quant.fp8_cast's kernels inside the
    compiled graph) against the unfused one casting with torch ops."""
    import quant.halo
    from fuyou.models.transformer import GeluMlp, TransformerConfig
    from quant import delayed_scaling
    from quant.halo import apply_halo

    config = TransformerConfig(family="gpt", vocab_size=64, hidden_size=256, num_layers=1, num_heads=4,
                               max_seq_len=128)
    x0, x = (torch.randn(4, 128, 256, device="cuda") * s for s in (1.0, 1.2))
    dy0, dy = (torch.randn(4, 128, 256, device="cuda") * 1e-3 for _ in range(2))
    results = []
    for fused in (True, False):
        quant.halo.use_fused_cast(fused)
        try:
            torch.manual_seed(0)
            mlp = GeluMlp(config).cuda()
            apply_halo(mlp, level=0, scaling="delayed")
            step = torch.compile(mlp, fullgraph=True)
            with torch.autocast("cuda", torch.bfloat16):
                step(x0).backward(dy0)  # current scaling
            delayed_scaling.end_step(mlp)
            mlp.zero_grad()
            x_in = x.clone().requires_grad_()
            with torch.autocast("cuda", torch.bfloat16):
                y = step(x_in)
            y.backward(dy)
            results.append([y.float(), x_in.grad.float(), mlp.up_proj.weight.grad, mlp.up_proj.bias.grad,
                            mlp.down_proj.weight.grad])
        finally:
            quant.halo.use_fused_cast(True)
    for fused_value, plain_value in zip(*results):
        assert ((fused_value - plain_value).norm() / plain_value.norm()).item() < 0.02


@pytest.mark.parametrize("opaque", [True, False])
@pytest.mark.parametrize("level", [0, 1])
def test_halo_forward_operands_through_the_kernel_match_torch_ops(fused_on_cpu, monkeypatch, level, opaque):
    """Under delayed scaling the forward casts the weight, and x of an `opaque_input` layer, with the kernel:
    both layouts in one pass, the exact amaxes recorded; any other x by torch ops, its transposed copy by
    `quant.fp8_cast.transpose`. Against the torch-op casts of the same tensors, with dY on torch ops in both
    runs. In fp32 both cast the same values, so the GEMMs agree to summation order."""
    import quant.halo
    from quant import delayed_scaling
    from quant.halo import HaloLinear

    monkeypatch.setitem(quant.halo._fused_cast, "linear_dy", False)
    results, kernel_inputs, transposed = [], [], []
    monkeypatch.setattr(quant.halo, "_kernel_operands", lambda x, *a, original=quant.halo._kernel_operands, **k:
                        kernel_inputs.append(x.shape) or original(x, *a, **k))
    monkeypatch.setattr(quant.halo, "fp8_transposed", lambda x, original=quant.halo.fp8_transposed:
                        transposed.append(x.values.shape) or original(x))
    for fused in (True, False):
        monkeypatch.setattr(quant.halo, "fused_cast_ready", lambda x, fused=fused: fused)
        torch.manual_seed(0)
        layer = HaloLinear(64, 48, level=level, scaling="delayed", amax_history=4, opaque_input=opaque)
        x0, dy0 = torch.randn(40, 64), torch.randn(40, 48) * 1e-3
        layer(x0).backward(dy0)  # the first step scales currently
        delayed_scaling.end_step(layer)
        layer.zero_grad()
        x = (x0 * 1.3).requires_grad_()
        y = layer(x)
        y.backward(dy0 * 1.5)
        results.append((y, x.grad, layer.weight.grad, layer.amax_state[-1].clone()))
    # In the delayed step of the fused run only: x and W through the kernel, or W alone and x's rows transposed.
    assert (kernel_inputs, transposed) == (([(40, 64), (48, 64)], []) if opaque else ([(48, 64)], [(40, 64)]))
    (y_k, dx_k, dw_k, pending_k), (y_t, dx_t, dw_t, pending_t) = results
    for kernel_value, torch_value in ((y_k, y_t), (dx_k, dx_t), (dw_k, dw_t)):
        torch.testing.assert_close(kernel_value, torch_value, rtol=1e-5, atol=1e-9)
    x_in = quant.halo._rotate(x0 * 1.3, -1, 256) if level else x0 * 1.3
    if opaque:
        assert pending_k[0] == x_in.abs().max()  # exact, from the kernel
    w_in = quant.halo._rotate(layer.weight.detach(), -1, 256) if level else layer.weight.detach()
    torch.testing.assert_close(pending_k[1], w_in.abs().max(), rtol=1e-6, atol=0)
    torch.testing.assert_close(pending_k[:2], pending_t[:2], rtol=2 ** -4, atol=0)  # read back from FP8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_halo_block_gemms_write_bf16():
    """A compiled HALO GPT block under bf16 autocast, delayed scaling with the kernel in forward and backward:
    every forward and input-gradient `_scaled_mm` writes bf16, and each weight gradient the fp32 of its master
    weight. Guards against the trace losing autocast (quant.halo.kernel_cast), which showed only as fp32 GEMM
    outputs and a slower step, not as a numerical difference."""
    from torch.profiler import ProfilerActivity, profile

    from fuyou.models import build_model
    from fuyou.models.transformer import TransformerConfig
    from quant import delayed_scaling
    from quant.halo import apply_halo

    config = TransformerConfig(family="gpt", vocab_size=64, hidden_size=256, num_layers=1, num_heads=4, max_seq_len=128)
    block = build_model(config, seed=0).blocks[0].cuda()
    apply_halo(block, level=0, scaling="delayed")
    step = torch.compile(block, fullgraph=True)

    def run():
        x = torch.randn(2, 128, 256, device="cuda", requires_grad=True)
        with torch.autocast("cuda", torch.bfloat16):
            y = step(x)
        y.float().square().mean().backward()
        delayed_scaling.end_step(block)

    import quant.halo

    quant.halo.use_kernel_for_linear_dy(True)  # the kernel in every backward: where the trace lost autocast
    try:
        run()  # current scaling
        run()  # delayed: the kernel casts A, du and every dY
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            run()
    finally:
        quant.halo.use_kernel_for_linear_dy(False)
    out_dtypes = [event.concrete_inputs[6] for event in profiler.events() if event.name == "aten::_scaled_mm"]
    # 4 linears x 3 GEMMs: forward and dX in c10::ScalarType::BFloat16 (15), dW in Float (6).
    assert sorted(out_dtypes) == [6] * 4 + [15] * 8, out_dtypes
