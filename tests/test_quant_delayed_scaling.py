"""HALO's delayed scaling (quant.delayed_scaling): what is recorded, when the scale changes, and training with it.

Every check is against independent float64 math: the expected FP8 operand is round-to-e4m3 of x / s with s
computed here from the amaxes the test itself fed in, so a wrong history, margin or saturation rule shows
as a mismatch, not as a slightly different error.
"""

import copy

import pytest
import torch
from torch import nn

from batches import fixed_batches
from fuyou import block_compile
from fuyou.config import TrainConfig
from fuyou.errors import ConfigError
from fuyou.models import build_model, get_preset
from fuyou.reference import ReferenceTrainer
from fuyou.trainer import Trainer
from quant.delayed_scaling import FP8_MAX, MARGIN, end_step, new_state
from quant.halo import HaloLinear, apply_halo, halo_matmul

FP8 = torch.float8_e4m3fn
X, W, DY = 0, 1, 2  # columns of amax_state
PENDING = -1


def e4m3(x, scale):
    """Independent simulation: x / scale clamped to ±448, rounded to e4m3, back in float64 times scale."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).double() * scale


def case(seed, tokens=32, in_features=64, out_features=48):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64)
    w = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    dy = torch.randn(tokens, out_features, generator=generator, dtype=torch.float64)
    return x, w, dy


def run(x, w, dy, state, delayed, level=0):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = halo_matmul(x, w, level=level, amax_state=state, delayed=delayed)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y.detach(), dx, dw


_holders = {}


def roll(state):
    """end_step on a module holding only `state` (the same module each time, so its ring advances)."""
    holder = _holders.setdefault(id(state), nn.Module())
    holder.register_buffer("amax_state", state)
    assert end_step(holder) == 1 and holder.delayed_active


def test_the_first_step_scales_currently_and_records_exact_amaxes():
    x, w, dy = case(0)
    state = new_state(4)
    with_state = run(x, w, dy, state, delayed=False)
    without = run(x, w, dy, None, delayed=False)
    assert all(torch.equal(a, b) for a, b in zip(with_state, without))  # recording changes no result
    expected = [x.abs().max(), w.abs().max(), dy.abs().max()]
    assert state[PENDING, :3].tolist() == pytest.approx([float(v) for v in expected], rel=1e-6)
    assert state[:PENDING].eq(0).all() and state[:, 3].eq(0).all()  # level 0 never rotates dY along tokens


def test_end_step_moves_pending_into_the_history_and_the_next_step_uses_it():
    x, w, dy = case(1)
    state = new_state(3)
    run(x, w, dy, state, delayed=False)
    amax = state[PENDING].clone()
    roll(state)
    assert torch.equal(state[0], amax) and state[PENDING].eq(0).all() and state[1:PENDING].eq(0).all()

    x2, w2, dy2 = 0.5 * x, w, 0.25 * dy  # smaller than the history: scaled by the history, not by themselves
    y, dx, dw = run(x2, w2, dy2, state, delayed=True)
    # The scale is an fp32 product, as the quantizer takes it; the rest is float64 (1e-6: fp32 operand casts).
    scale_x, scale_w, scale_dy = ((amax[i] * (MARGIN / FP8_MAX)).double() for i in (X, W, DY))
    qx, qw, qdy = e4m3(x2, scale_x), e4m3(w2, scale_w), e4m3(dy2, scale_dy)
    torch.testing.assert_close(y, qx @ qw.t(), rtol=1e-6, atol=0)
    torch.testing.assert_close(dx, qdy @ qw, rtol=1e-6, atol=0)
    torch.testing.assert_close(dw, qdy.t() @ qx, rtol=1e-6, atol=0)
    # Nothing saturated, so the amaxes read back from the FP8 values are those of the FP8 tensors.
    recorded = [qx.abs().max(), qw.abs().max(), qdy.abs().max()]
    assert state[PENDING, :3].tolist() == pytest.approx([float(v) for v in recorded], rel=1e-6)


def test_a_tensor_that_outgrows_its_history_saturates_and_its_scale_grows_until_it_fits():
    x, w, dy = case(2)
    state = new_state(2)
    run(x, w, dy, state, delayed=False)
    first_amax = float(state[PENDING, X])
    roll(state)
    big = 5 * x  # 5x the history: past the 2x headroom
    y, _, _ = run(big, w, dy, state, delayed=True)
    scale = MARGIN * first_amax / FP8_MAX
    assert e4m3(big, scale).abs().max() == pytest.approx(FP8_MAX * scale)  # clamped, finite
    assert torch.isfinite(y).all()
    assert float(state[PENDING, X]) == pytest.approx(MARGIN * FP8_MAX * scale)  # = 4x the first amax
    roll(state)  # the ring of 2 holds 1x and 4x; the headroom over 4x reaches 8x
    assert sorted(state[:PENDING, X].tolist()) == pytest.approx([first_amax, 4 * first_amax])
    run(big, w, dy, state, delayed=True)  # 5x fits and is recorded exactly (to e4m3 rounding)
    assert float(state[PENDING, X]) == pytest.approx(float(big.abs().max()), rel=2 ** -4)
    roll(state)  # the ring drops 1x, its oldest entry: 4x and 5x remain
    low, high = sorted(state[:PENDING, X].tolist())
    assert low == pytest.approx(4 * first_amax) and high == pytest.approx(float(big.abs().max()), rel=2 ** -4)


def test_a_recompute_in_the_same_step_quantizes_identically():
    x, w, dy = case(3)
    state = new_state(2)
    run(x, w, dy, state, delayed=False)
    roll(state)
    first = run(1.5 * x, w, dy, state, delayed=True)
    pending = state[PENDING].clone()
    again = run(1.5 * x, w, dy, state, delayed=True)  # activation checkpointing's recompute, or a 2nd micro-batch
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and torch.equal(state[PENDING], pending)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_each_delayed_fp8_gemm_is_within_e4m3_error_of_float64(level):
    x, w, dy = case(4)
    state = new_state(2)
    run(x, w, dy, state, delayed=False, level=level)
    if level == 2:
        assert state[PENDING, 3] > 0  # level 2 quantizes dY rotated along tokens too, in its own row
    roll(state)
    y, dx, dw = run(x, w, dy, state, delayed=True, level=level)
    for name, actual, expected in (("forward", y, x @ w.t()), ("input grad", dx, dy @ w), ("weight grad", dw, dy.t() @ x)):
        error = ((actual - expected).norm() / expected.norm()).item()
        assert 0.005 < error < 0.06, (name, error)


def test_halo_linear_keeps_its_state_out_of_the_state_dict_and_needs_a_state_to_delay():
    linear = nn.Linear(16, 8)
    halo = HaloLinear.from_linear(linear, level=0, scaling="delayed", amax_history=5)
    assert halo.amax_state.shape == (6, 4) and not halo.delayed_active
    assert set(halo.state_dict()) == {"weight", "bias"}
    with pytest.raises(ValueError, match="amax_state"):
        halo_matmul(torch.randn(4, 16), linear.weight, level=0, delayed=True)
    with pytest.raises(ValueError, match="scaling"):
        apply_halo(nn.Sequential(nn.Linear(4, 4)), level=0, scaling="stale")


SCHEDULE = dict(lr=3e-3, warmup_steps=2, total_steps=20, min_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0)


def train(model, batches, steps, delayed, **kwargs):
    trainer = ReferenceTrainer(model, **SCHEDULE, **kwargs)
    losses = []
    for step in range(steps):
        losses.append(trainer.step([batches[step % len(batches)]]).loss)
        if delayed:
            end_step(model)
    return losses


@pytest.mark.parametrize("checkpointing", [False, True])
def test_delayed_scaling_trains_like_current_scaling(checkpointing):
    base = build_model(get_preset("tiny-llama"), seed=0)
    batches = fixed_batches(1, 2, base.config.vocab_size, batch_size=2)
    current, delayed = copy.deepcopy(base), copy.deepcopy(base)
    apply_halo(current, level=1)
    apply_halo(delayed, level=1, scaling="delayed", amax_history=4)
    expected = train(current, batches, 20, delayed=False, activation_checkpointing=checkpointing)
    actual = train(delayed, batches, 20, delayed=True, activation_checkpointing=checkpointing)
    assert actual[0] == expected[0]  # step 1 scales currently in both
    assert actual[-1] < 0.5 * actual[0]
    assert actual[-1] == pytest.approx(expected[-1], rel=0.05)
    states = [m.amax_state for m in delayed.modules() if isinstance(m, HaloLinear)]
    assert states and all(s[:-1, :3].gt(0).all() for s in states)  # four steps of x, w, dy amaxes in each history


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # the Hadamard blocks' cache
def test_compiled_delayed_scaling_matches_eager(monkeypatch):
    # The state is mutated in forward and in backward; both must survive dynamo and AOTAutograd (fullgraph).
    monkeypatch.setattr(block_compile, "BACKEND", "aot_eager")
    config = get_preset("tiny-llama").replace(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                                              intermediate_size=160, vocab_size=300)
    model = build_model(config, seed=0)
    apply_halo(model, level=0, scaling="delayed", amax_history=2)
    data = fixed_batches(8, 3, config.vocab_size, batch_size=2, seq_len=16)
    eager_model, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    eager = ReferenceTrainer(eager_model, **SCHEDULE)
    compiled = ReferenceTrainer(compiled_model, compile_blocks=True, **SCHEDULE)
    for batch in data:
        assert compiled.step([batch]).loss == pytest.approx(eager.step([batch]).loss, rel=1e-5)
        end_step(eager_model), end_step(compiled_model)
    for a, b in zip(eager_model.modules(), compiled_model.modules()):
        if isinstance(a, HaloLinear):
            torch.testing.assert_close(b.amax_state, a.amax_state, rtol=1e-5, atol=0)


def test_the_trainer_ends_each_step_and_the_config_checks_the_options(tmp_path):
    config = TrainConfig.from_yaml("configs/tiny.yaml", [
        "device=cpu", "train.steps=3", "train.batch_size=2", "train.seq_len=16", "train.save_final=false",
        "quant.mode=halo", "quant.halo_level=0", "quant.halo_scaling=delayed", "quant.halo_amax_history=2"])
    trainer = Trainer(config, output_dir=tmp_path / "run", progress=False)
    losses = [trainer.step().loss for _ in range(3)]
    assert all(loss == loss for loss in losses)
    halos = [m for m in trainer.model.modules() if isinstance(m, HaloLinear)]
    assert halos and all(m.delayed_active and m.amax_state[:-1, :3].gt(0).all() for m in halos)
    with pytest.raises(ConfigError, match="quant.halo_scaling=delayed runs on runtime=reference"):
        TrainConfig.from_yaml(None, ["quant.mode=halo", "quant.halo_scaling=delayed", "runtime=fuyou"])
    with pytest.raises(ConfigError, match="quant.halo_amax_history must be >= 1"):
        TrainConfig.from_yaml(None, ["quant.halo_amax_history=0"])
    with pytest.raises(ConfigError, match="quant.halo_scaling must be one of"):
        TrainConfig.from_yaml(None, ["quant.halo_scaling=late"])


@pytest.mark.gpu
@pytest.mark.parametrize("level", [0, 2])
def test_delayed_scaled_mm_matches_the_simulation_on_cuda(level):
    """The CUDA path (torch._scaled_mm, the compiled quantizer recording into the state) against the CPU
    simulation, over a current step and a delayed one with a tensor past its headroom."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, w, dy = (t.float() for t in case(5, tokens=100, in_features=28 * 16, out_features=80))
    results = {}
    for device in ("cpu", "cuda"):
        state = new_state(2, device)
        args = [t.to(device) for t in (x, w, dy)]
        run(*args, state, delayed=False, level=level)
        roll(state)
        outputs = run(3 * args[0], args[1], 0.5 * args[2], state, delayed=True, level=level)
        results[device] = ([o.cpu() for o in outputs], state.cpu())
    for actual, expected in zip(results["cuda"][0], results["cpu"][0]):
        assert relative_error_of(actual, expected) < 1e-2
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-2, atol=0)


def relative_error_of(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
