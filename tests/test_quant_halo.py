"""HALO: Hadamard rotations, FP8 GEMMs per level against float64 math, and training with the reference trainer.

Tolerances. e4m3 rounds each operand to 3 mantissa bits (relative error <= 2^-4, ~2.5% RMS for Gaussian
data); a GEMM of two such operands lands near 3.5-4% relative (Frobenius) error, so FP8 checks use 6%
and also require > 0.5% to prove quantization really happened. Without quantization every rotation must
cancel to float64 rounding (1e-12).
"""

import copy
import functools
import math

import pytest
import torch
from torch import nn

from batches import fixed_batches
from fuyou.models import build_model, get_preset
from fuyou.reference import ReferenceTrainer
from quant import halo as halo_module
from quant.hadamard import (
    block_order,
    hadamard_layout,
    hadamard_matrix,
    rotate,
    rotate_blocks,
)
from quant.halo import FP8_MAX, HaloLinear, apply_halo, halo_matmul, quantize_fp8

FP8_RTOL = 0.06
EXACT_RTOL = 1e-12


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def sylvester(n):
    """Independent reference for powers of two: H_2 ⊗ ... ⊗ H_2, normalised."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return h / math.sqrt(n)


def walsh_hadamard_butterfly(x):
    """Independent reference for powers of two along the last axis: log2(n) stages of (a + b, a - b)."""
    n, half = x.shape[-1], 1
    while half < n:
        pairs = x.reshape(*x.shape[:-1], n // (2 * half), 2, half)
        x = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        x = x.reshape(*x.shape[:-3], n)
        half *= 2
    return x / math.sqrt(n)


@pytest.mark.parametrize("n", [2, 64, 12, 20, 28, 36, 44, 148, 28 * 8, 44 * 8, 20 * 16])
def test_hadamard_is_orthogonal_and_fully_mixing(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # A full Hadamard matrix: every entry is +-1/sqrt(n), so an outlier is spread evenly over all n outputs.
    torch.testing.assert_close(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    assert hadamard_layout(n).is_full


def test_power_of_two_equals_sylvester_and_rotates_any_axis():
    for n in (64, 512):  # one factor; 64 x 8 (the factors must compose in Kronecker order)
        torch.testing.assert_close(hadamard_matrix(n), sylvester(n), rtol=0, atol=1e-14)
    x = torch.randn(3, 8192, dtype=torch.float64)  # 64 x 64 x 2, against a radix-2 butterfly
    torch.testing.assert_close(rotate(x), walsh_hadamard_butterfly(x), rtol=0, atol=1e-12)
    h = hadamard_matrix(28 * 4)  # not symmetric (Paley I factor): checks the side each axis is multiplied on
    x = torch.randn(28 * 4, 6, 28 * 4, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, -1), x @ h, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate(x, 0), torch.einsum("ij,iab->jab", h, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate(x, 0, inverse=True), torch.einsum("ji,iab->jab", h, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate(rotate(x, 2), 2, inverse=True), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, dense", [(14336, 28), (28672, 28), (10240, 20), (18944, 148), (12288, 12), (4096, 1)])
def test_llm_sizes_get_a_full_hadamard(n, dense):
    """LLaMA-3 F=14336 (8B) and 28672 (70B), 70B's q/k/v rows 10240, Qwen2-7B F=18944, GPT-3 175B D=12288."""
    layout = hadamard_layout(n)
    assert layout.is_full and layout.dense == dense and layout.dense * layout.power == n
    x = torch.randn(2, n, dtype=torch.float64)
    y = rotate(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(rotate(y, inverse=True), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, order", [(2048, 256), (224, 16), (24, 4), (64, 64), (6, 1)])
def test_block_rotation_is_kron_of_identity_and_sylvester(n, order):
    """rotate_blocks = I_(n/b) ⊗ H_b with b the largest power of 4 <= 256 dividing n, on either axis; it is
    its own inverse, and in bf16 it equals the float64 product to bf16 rounding (its entries are exact)."""
    assert block_order(n, 256) == order
    h = torch.kron(torch.eye(n // order, dtype=torch.float64), sylvester(order))
    x = torch.randn(3, 2, n, dtype=torch.float64)
    torch.testing.assert_close(rotate_blocks(x, -1), x @ h, rtol=0, atol=1e-12)
    x = torch.randn(n, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(rotate_blocks(x, 0), torch.einsum("ij,iab->jab", h, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate_blocks(rotate_blocks(x, 0), 0), x, rtol=0, atol=1e-12)
    x_bf16 = torch.randn(4, n).to(torch.bfloat16)
    assert relative_error(rotate_blocks(x_bf16, -1).double(), x_bf16.double() @ h) < 2**-8


def test_llm_sizes_get_blocks_of_256():
    """Every hidden and MLP size of the presets (2048, 4096, 14336 = 56 x 256, 28672, 5120) is a multiple of 256."""
    assert all(block_order(n, 256) == 256 for n in (2048, 4096, 8192, 14336, 28672, 5120, 6144))


@pytest.mark.parametrize("n", [66, 7, 2 * 9])
def test_sizes_without_a_hadamard_fall_back_to_orthogonal_blocks(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not hadamard_layout(n).is_full


def test_quantize_fp8_maps_the_largest_magnitude_to_448_and_rounds_to_e4m3():
    x = torch.tensor([0.0, 1.0, -3.3, 7.0, 1000.0])
    x_fp8, scale = quantize_fp8(x)
    assert x_fp8.dtype == torch.float8_e4m3fn
    assert scale.item() == pytest.approx(1000.0 / FP8_MAX)
    assert x_fp8.float()[-1].item() == FP8_MAX
    # Round-trip of a value already on the e4m3 grid (after scaling) is exact; others move <= 2^-4 relative.
    dequantized = x_fp8.float() * scale
    assert torch.all((dequantized - x).abs() <= x.abs() * 2**-4 + 1e-6)
    assert quantize_fp8(torch.zeros(3))[1].item() == 1.0


def test_quantize_fp8_of_bf16_rounds_once():
    """A bf16 tensor is scaled in fp32 and rounded once to e4m3, exactly as its fp32 copy is (no detour
    through a bf16 product, which would round twice and differ from the GPU's compiled quantizer)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    from_bf16, scale_bf16 = quantize_fp8(x)
    from_fp32, scale_fp32 = quantize_fp8(x.float())
    assert torch.equal(scale_bf16, scale_fp32)
    assert torch.equal(from_bf16.view(torch.uint8), from_fp32.view(torch.uint8))


def gemm_case(seed, tokens=24, in_features=28 * 8, out_features=96, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=generator, dtype=dtype)
    w = torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    dy = torch.randn(tokens, out_features, generator=generator, dtype=dtype)
    return x, w, dy


def halo_gemms(x, w, dy, **kwargs):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = halo_matmul(x, w, **kwargs)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y.detach(), dx, dw


@pytest.mark.parametrize("level", [0, 1, 2])
def test_rotations_cancel_exactly_without_quantization(level):
    """Q = identity: each of the three GEMMs equals float64 math, so every rotation is placed and undone right.

    24 tokens and 224 = 28 * 8 features use the Paley x Sylvester path on both rotated axes.
    """
    x, w, dy = gemm_case(0)
    y, dx, dw = halo_gemms(x, w, dy, level=level, quantize=False)
    assert relative_error(y, x @ w.t()) < EXACT_RTOL
    assert relative_error(dx, dy @ w) < EXACT_RTOL
    assert relative_error(dw, dy.t() @ x) < EXACT_RTOL


@pytest.mark.parametrize("level", [0, 1, 2])
def test_each_fp8_gemm_is_within_e4m3_error_of_float64(level):
    x, w, dy = gemm_case(1)
    y, dx, dw = halo_gemms(x, w, dy, level=level)
    cases = (("forward", y, x @ w.t()), ("input grad", dx, dy @ w), ("weight grad", dw, dy.t() @ x))
    for name, actual, expected in cases:
        error = relative_error(actual, expected)
        assert 0.005 < error < FP8_RTOL, (name, error)


@pytest.mark.parametrize("hadamard_block, rtol", [(None, FP8_RTOL), (256, 0.12)])
def test_rotation_rescues_small_values_next_to_an_activation_outlier(hadamard_block, rtol):
    """One activation of 1e6 sets the per-tensor scale; the other tokens fall below e4m3's subnormal range
    and their outputs are lost at level 0. Rotating along the input features (level 1) spreads the outlier
    over its own row only: over all 1024 features with the full H (amax / 32), or over its block of 256
    with the default block-diagonal H (amax / 16, so the other tokens sit at the top of e4m3's subnormal
    range: seen 8.3% error, against 95% at level 0)."""
    x, w, _ = gemm_case(2, tokens=64, in_features=1024)
    x[3, 5] = 1e6
    others = torch.arange(64) != 3
    exact = x @ w.t()
    level0 = relative_error(halo_matmul(x, w, level=0)[others], exact[others])
    level1 = relative_error(halo_matmul(x, w, level=1, hadamard_block=hadamard_block)[others], exact[others])
    assert level0 > 0.5 and level1 < rtol, (level0, level1)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_halo_linear_matches_nn_linear(level):
    torch.manual_seed(3)
    linear = nn.Linear(28 * 4, 48, dtype=torch.float64)
    x = torch.randn(2, 5, 28 * 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, 48, dtype=torch.float64)
    expected_y = linear(x)
    expected = torch.autograd.grad(expected_y, (x, linear.weight, linear.bias), dy)
    for quantize, rtol in ((False, EXACT_RTOL), (True, FP8_RTOL)):
        halo = HaloLinear.from_linear(linear, level=level, quantize=quantize)
        assert halo.weight is linear.weight and halo.bias is linear.bias
        y = halo(x)
        grads = torch.autograd.grad(y, (x, halo.weight, halo.bias), dy)
        assert relative_error(y, expected_y) < rtol
        for actual, reference in zip(grads, expected):
            assert relative_error(actual, reference) < rtol
    # Finite differences agree with the analytic backward (possible only without the rounding of Q).
    x_small = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    w_small = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: halo_matmul(a, b, level=level, quantize=False), (x_small, w_small))


def test_frozen_weight_skips_the_weight_gradient():
    x, w, dy = gemm_case(4)
    x.requires_grad_()
    y = halo_matmul(x, w, level=2)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    assert relative_error(dx, dy @ w) < FP8_RTOL


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt3"])
def test_apply_halo_swaps_every_block_linear_but_not_the_head(preset):
    model = build_model(get_preset(preset), seed=0)
    parameters_before = dict(model.named_parameters())
    swapped = apply_halo(model, level=1)
    per_block = 4  # qkv_proj, o_proj, up/gate_up_proj, down_proj
    assert len(swapped) == per_block * model.config.num_layers
    assert all(isinstance(model.get_submodule(name), HaloLinear) for name in swapped)
    assert model.lm_head is None or type(model.lm_head) is nn.Linear
    parameters_after = dict(model.named_parameters())
    assert parameters_after.keys() == parameters_before.keys()
    assert all(parameters_after[name] is parameters_before[name] for name in parameters_before)
    assert apply_halo(model, level=1) == []  # idempotent: HaloLinear is not a plain nn.Linear


SCHEDULE = dict(lr=3e-3, warmup_steps=2, total_steps=20, min_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0)


def train(model, batches, steps, **kwargs):
    trainer = ReferenceTrainer(model, **SCHEDULE, **kwargs)
    return [trainer.step([batches[step % len(batches)]]).loss for step in range(steps)]


def test_halo_level2_without_quantization_trains_exactly_like_the_reference():
    """Rotations on all three GEMMs of every block, end to end through the reference trainer: same losses."""
    base = build_model(get_preset("tiny-llama"), seed=0)
    rotated = copy.deepcopy(base)
    apply_halo(rotated, level=2, quantize=False)
    batches = fixed_batches(0, 2, base.config.vocab_size)
    expected, actual = train(base, batches, 4), train(rotated, batches, 4)
    assert actual == pytest.approx(expected, rel=1e-5)


TRACKING_STEPS = 20


@functools.cache
def fp32_losses(steps):
    """The fp32 reference run every HALO level is compared with (computed once per session)."""
    model = build_model(get_preset("tiny-llama"), seed=0)
    return train(model, fixed_batches(1, 2, model.config.vocab_size, batch_size=2), steps)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_halo_fp8_training_loss_falls_and_tracks_fp32(level):
    halo = build_model(get_preset("tiny-llama"), seed=0)
    apply_halo(halo, level=level)
    actual = train(halo, fixed_batches(1, 2, halo.config.vocab_size, batch_size=2), TRACKING_STEPS)
    expected = fp32_losses(TRACKING_STEPS)
    assert actual[-1] < 0.5 * actual[0]  # memorising two batches: ln(512) = 6.26 -> ~2.7 (fp32: 2.71)
    assert actual[-1] == pytest.approx(expected[-1], rel=0.05)  # seen: 0.2% (level 1) to 1.2% (level 0)


def test_halo_runs_under_bf16_autocast_with_fp32_master_weights():
    model = build_model(get_preset("tiny-gpt3"), seed=0)
    apply_halo(model, level=2)
    batches = fixed_batches(2, 1, model.config.vocab_size)
    losses = train(model, batches, 3, precision="bf16")
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("level", [0, 1])
def test_halo_weight_gradient_comes_back_in_fp32_from_the_gemm_under_autocast(level):
    """Under autocast HaloMatmul casts the fp32 master weight itself, so autograd holds no cast node between
    the weight and the GEMM, and dW leaves the (simulated) GEMM in fp32: at level 0 with more than bf16's
    8 bits of mantissa, where a bf16 GEMM output cast to fp32 would have exactly bf16's."""
    torch.manual_seed(7)
    layer = HaloLinear(64, 48, level=level)
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    matmul = y.grad_fn.next_functions[0][0]  # under the reshape back to x's leading axes
    assert type(matmul).__name__ == "HaloMatmulBackward"
    weight_node = matmul.next_functions[1][0]
    assert getattr(weight_node, "variable", None) is layer.weight  # AccumulateGrad: no ToCopyBackward between
    y.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    if level == 0:
        assert not torch.equal(layer.weight.grad, layer.weight.grad.bfloat16().float())

@pytest.mark.gpu
@pytest.mark.parametrize("level", [0, 1, 2])
def test_scaled_mm_matches_the_simulated_gemm_on_cuda(level):
    """torch._scaled_mm (FP8 tensor cores, fp32 accumulation) against the CPU simulation of the same FP8
    values; only accumulation order and the bf16 output rounding (2^-8) differ. 100 tokens checks padding."""
    x, w, dy = gemm_case(5, tokens=100, in_features=28 * 16, out_features=80, dtype=torch.bfloat16)
    cpu = halo_gemms(x.float(), w.float(), dy.float(), level=level, out_dtype=torch.bfloat16)
    gpu = halo_gemms(x.float().cuda(), w.float().cuda(), dy.float().cuda(), level=level, out_dtype=torch.bfloat16)
    for actual, expected in zip(gpu, cpu):
        assert relative_error(actual.cpu().float(), expected.float()) < 1e-2


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("tokens", [128, 100])
def test_scaled_mm_layouts_on_the_cpu(monkeypatch, level, tokens):
    """The CUDA code path, run on the CPU's torch._scaled_mm: every FP8 operand reaches it row-major with its
    reduced axis contiguous (Hopper's only FP8 layout, so the GPU makes no hidden copy), and the three GEMMs
    equal the simulated ones to the bf16 output rounding. 100 tokens checks padding to multiples of 16."""
    seen = []

    def scaled_mm_gemm(a_MK, b_NK, out_dtype, *, fast_accum=False, bias_N=None):
        if a_MK.scale is None:
            return simulated(a_MK, b_NK, out_dtype, bias_N=bias_N)
        seen.append((a_MK.values.is_contiguous(), b_NK.values.is_contiguous()))
        return halo_module._scaled_mm(a_MK, b_NK, out_dtype, fast_accum, bias_N)

    x, w, dy = gemm_case(6, tokens=tokens, in_features=256, out_features=96, dtype=torch.bfloat16)
    expected = halo_gemms(x, w, dy, level=level)
    simulated = halo_module._gemm
    monkeypatch.setattr(halo_module, "_gemm", scaled_mm_gemm)
    actual = halo_gemms(x, w, dy, level=level)
    assert seen == [(True, True)] * 3
    for name, got, reference in zip(("forward", "input grad", "weight grad"), actual, expected, strict=True):
        assert relative_error(got.float(), reference.float()) < 1e-2, name


def test_halo_under_lora_trains_only_the_adapters():
    """HALO base GEMMs with peft LoRA on top: peft wraps HaloLinear as the nn.Linear it is."""
    peft = pytest.importorskip("peft")
    model = build_model(get_preset("tiny-llama"), seed=0)
    apply_halo(model, level=1)
    model.requires_grad_(False)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    lora = peft.get_peft_model(model, config)
    assert isinstance(lora.get_base_model().blocks[0].attn.qkv_proj.get_base_layer(), HaloLinear)
    frozen = lora.get_base_model().blocks[0].attn.qkv_proj.get_base_layer().weight.detach().clone()
    losses = train(lora, fixed_batches(3, 1, model.config.vocab_size), 10)
    assert losses[-1] < 0.92 * losses[0], losses  # rank-8 adapters, 10 warm-up-scale steps: 6.27 -> 5.58
    assert torch.equal(lora.get_base_model().blocks[0].attn.qkv_proj.get_base_layer().weight, frozen)


@pytest.mark.parametrize("quantize, rtol", [(False, 1e-5), (True, 5e-3)])
def test_halo_trains_under_the_fuyou_runtime_like_under_the_reference(quantize, rtol):
    """The offload runtime streams HaloLinear's weights like any nn.Linear's. Rotations alone keep the
    runtime's 1e-5 parity; with FP8 the two runs differ only where a last-bit difference in a GEMM input
    flips an e4m3 rounding (seen: <= 7e-4 over 6 steps)."""
    from fuyou.runtime import FuyouRuntime

    model = build_model(get_preset("tiny-llama"), seed=0)
    apply_halo(model, level=2, quantize=quantize)
    schedule = dict(SCHEDULE, total_steps=6)
    reference = ReferenceTrainer(copy.deepcopy(model), **schedule)
    runtime = FuyouRuntime(copy.deepcopy(model), params="cpu", optimizer="cpu", activations="cpu", **schedule)
    batches = fixed_batches(4, 2, model.config.vocab_size, batch_size=2, seq_len=24)
    try:
        for step in range(6):
            expected, got = reference.step([batches[step % 2]]), runtime.step([batches[step % 2]])
            assert got.loss == pytest.approx(expected.loss, rel=rtol)
    finally:
        runtime.close()
