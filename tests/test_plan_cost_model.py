"""The cost model on hand-computed tiny cases, its FLOP conventions, and monotonicity in the hardware."""

import dataclasses

import pytest

from fuyou.errors import ConfigError

from fuyou.models import get_preset
from fuyou.plan import HardwareProfile, Plan, predict
from fuyou.plan import cost_model
from fuyou.plan.cost_model import GiB, Legs, leg_times

ROUND = HardwareProfile(  # round numbers so each time is easy to write down
    name="round", compute_device="cuda", gpu_tflops=1.0, gpu_fp8_tflops=0.0, gpu_memory_gb=24.0, h2d_gbps=1.0,
    d2h_gbps=2.0, pcie_duplex_gbps=2.5, cpu_memory_gb=512.0, cpu_adam_gparams_per_s=1.0, ssd_read_gbps=1.0,
    ssd_write_gbps=0.5, ssd_count=2, source="test",
)
TESTBED = HardwareProfile.from_yaml("configs/hardware/rtx4090-12ssd.yaml")


def test_block_flops_by_hand_gpt():
    # tiny-gpt3: D 128, 4 heads of 32, F 512. B 2, S 8 -> T 16.
    flops = cost_model.block_forward_flops(get_preset("tiny-gpt3"), 2, 8)
    attention_weights = 128 * 384 + 128 * 128  # q/k/v and output projections
    quadratic = 4 * 2 * 8 * 8 * 4 * 32  # QK^T and AV, full S x S
    assert flops.attention == 2 * 16 * attention_weights + quadratic == 2_162_688
    assert flops.mlp == 2 * 16 * (2 * 128 * 512) == 4_194_304


def test_block_flops_by_hand_llama_gqa():
    # tiny-llama: D 128, H 4, K 2, E 32, F 352, SwiGLU (three D x F matrices)
    attention, mlp = cost_model.block_matmul_params(get_preset("tiny-llama"))
    assert attention == 128 * (4 + 2 * 2) * 32 + 4 * 32 * 128 == 49_152
    assert mlp == 3 * 128 * 352


def test_megatron_formula_by_hand_and_against_hardware_flops():
    one = get_preset("tiny-gpt3").replace(num_layers=1, hidden_size=4, num_heads=1, vocab_size=1)
    # 24 c B S L D^2 (1 + S/6D + V/16LD), B=1 S=2 L=1 D=4 V=1, c=4
    assert cost_model.megatron_flops(one, 1, 2) == pytest.approx(24 * 4 * 2 * 16 * (1 + 2 / 24 + 1 / 64))
    # With every block recomputed whole, the GPU executes exactly what Megatron's formula counts (GPT, F = 4D);
    # the runtime's recompute skips each block's down projection, 2·T·F·D fewer per block and micro-batch.
    model = get_preset("gpt3-13b")
    plan = Plan(params="cpu", optimizer="ssd", activations="cpu", micro_batch_size=4, grad_accum=2, seq_len=1024,
                recompute_last_linear=True)
    prediction = predict(model, plan, TESTBED)
    assert prediction.hardware_flops == pytest.approx(prediction.megatron_flops, rel=1e-12)
    assert prediction.model_flops == 6 * model.num_parameters() * 8 * 1024
    skipping = predict(model, plan.replace(recompute_last_linear=False), TESTBED)
    last_gemms = 2 * model.num_layers * 2 * (4 * 1024) * model.ffn_size * model.hidden_size
    assert prediction.hardware_flops - skipping.hardware_flops == pytest.approx(last_gemms, rel=1e-12)


def test_leg_times_by_hand():
    legs = Legs(compute_flops=2e12, h2d_bytes=3e9, d2h_bytes=2e9, ssd_read_bytes=4e9, ssd_write_bytes=1e9, optimizer_params=5e9)
    times = leg_times(legs, ROUND)
    assert times.compute_s == pytest.approx(2.0)
    assert times.pcie_s == pytest.approx(3.0)  # max(3/1, 2/2, (3+2)/2.5)
    assert times.ssd_s == pytest.approx(4 / 2 + 1 / 1)  # two drives striped; read then write
    assert times.optimizer_s == pytest.approx(5.0)
    assert times.overlapped_s == pytest.approx(5.0) and times.serial_s == pytest.approx(2 + 3 + 1 + 3 + 5)
    assert times.bottleneck == "optimizer"
    duplex_bound = leg_times(Legs(h2d_bytes=2e9, d2h_bytes=3e9), ROUND)
    assert duplex_bound.pcie_s == pytest.approx(2.0)  # (2+3)/2.5 beats max(2/1, 3/2)


def test_step_by_hand_with_one_block():
    """One GPT block, everything in RAM: each phase written out from the legs."""
    model = get_preset("tiny-gpt3").replace(num_layers=1)
    plan = Plan(params="cpu", optimizer="cpu", activations="cpu", micro_batch_size=2, grad_accum=1, seq_len=8)
    hw = ROUND.replace(gpu_tflops=1e-6)  # 1 MFLOP/s: compute dominates every stage
    p = predict(model, plan, hw)
    block = cost_model.block_forward_flops(model, 2, 8).forward
    down_proj = 2 * 16 * 512 * 128  # 2 T F D: the recompute skips it
    head = 2 * 16 * 128 * 512
    assert p.forward_s == pytest.approx(block / 1e6)
    assert p.backward_s == pytest.approx((3 * block - down_proj) / 1e6)  # backward 2x forward + recompute
    assert p.head_s == pytest.approx(3 * head / 1e6)
    P_b = model.num_block_parameters()
    assert p.prologue_s == pytest.approx(2 * P_b / 1e9)  # first block's bf16 weights over 1 GB/s
    outer = model.num_parameters() - P_b
    epilogue = (4 * P_b / 2e9 + P_b / 1e9) + (4 * outer / 2e9 + 4 * outer / 1e9 + outer / 1e9)  # fp32 gradients out
    assert p.epilogue_s == pytest.approx(epilogue)
    assert p.iteration_s == pytest.approx(p.prologue_s + p.forward_s + p.head_s + p.backward_s + p.epilogue_s)


def test_gradient_accumulation_repeats_passes_not_the_update():
    model = get_preset("gpt3-1.3b")
    one = predict(model, Plan("cpu", "cpu", "cpu", micro_batch_size=4, grad_accum=1, seq_len=512), TESTBED)
    four = predict(model, Plan("cpu", "cpu", "cpu", micro_batch_size=4, grad_accum=4, seq_len=512), TESTBED)
    assert four.forward_s == pytest.approx(4 * one.forward_s)
    assert four.epilogue_s == pytest.approx(one.epilogue_s)
    assert four.optimizer_busy_s == pytest.approx(one.optimizer_busy_s)


def test_swapping_internals_removes_recompute():
    model = get_preset("gpt3-1.3b")
    base = Plan("cpu", "cpu", "cpu", micro_batch_size=4, grad_accum=1, seq_len=512)
    full = predict(model, base, TESTBED)
    swapped = predict(model, base.replace(swapped_attention_blocks=24, swapped_mlp_blocks=24), TESTBED)
    flops = cost_model.block_forward_flops(model, 4, 512)
    fwd, down_proj = flops.forward, flops.last_linear
    assert full.hardware_flops - swapped.hardware_flops == pytest.approx(24 * (fwd - down_proj))  # skipped in both
    assert swapped.cpu_peak_bytes > full.cpu_peak_bytes
    none = predict(model, base.replace(activations="none"), TESTBED)
    assert none.hardware_flops - full.hardware_flops == pytest.approx(24 * 23 / 2 * fwd)  # x_j rebuilt from x_0


def test_streaming_from_the_masters_trades_pcie_bytes_for_the_publish_pass_and_ram():
    model = get_preset("gpt3-6.7b")
    N, L, P_b = model.num_parameters(), model.num_layers, model.num_block_parameters()
    home = Plan("cpu", "cpu", "cpu", micro_batch_size=40, grad_accum=1, seq_len=1024, prefetch_depth=2)
    from_masters = home.replace(params="master")
    hw = TESTBED.replace(cpu_memory_gbps=20.0)
    a, b = predict(model, home, hw), predict(model, from_masters, hw)
    # 4 B instead of 2 per weight for each of the 2L fetches (forward, backward) and the prologue's
    assert b.pcie_bytes - a.pcie_bytes == pytest.approx((4 - 2) * P_b * (2 * L + 1), rel=1e-9)
    # no (4 + 2) B/param cast into the weights' home after each block's update
    assert a.optimizer_busy_s - b.optimizer_busy_s == pytest.approx(6 * L * P_b / 20e9, rel=1e-6)
    assert a.cpu_peak_bytes - b.cpu_peak_bytes == 2 * L * P_b
    size = cost_model.sizes(model, from_masters)
    assert b.gpu_peak_bytes - a.gpu_peak_bytes == 3 * (4 - 2) * P_b + size.block_param_bytes  # fp32 in flight + the cast
    with pytest.raises(ConfigError, match="needs optimizer cpu"):
        from_masters.replace(optimizer="ssd")
    assert N > 6.5e9


def test_the_outer_optimizer_on_the_gpu_removes_the_steps_serial_tail_for_its_moments():
    model = get_preset("gpt3-6.7b")
    plan = Plan("master", "cpu", "cpu", micro_batch_size=40, grad_accum=1, seq_len=1024, prefetch_depth=2)
    on_cpu, on_gpu = predict(model, plan, TESTBED), predict(model, plan.replace(outer_optimizer="gpu"), TESTBED)
    outer = model.num_parameters() - model.num_layers * model.num_block_parameters()
    assert on_gpu.gpu_peak_bytes - on_cpu.gpu_peak_bytes == 8 * outer  # exp_avg, exp_avg_sq
    assert on_cpu.cpu_peak_bytes - on_gpu.cpu_peak_bytes == 16 * outer  # state and gradient accumulator
    assert on_gpu.epilogue_s < on_cpu.epilogue_s and on_gpu.forward_s == on_cpu.forward_s
    assert "offload.outer_optimizer=gpu" in plan.replace(outer_optimizer="gpu").config_overrides()
    assert not any("outer_optimizer" in override for override in plan.config_overrides())


def test_peak_memory_by_tier():
    model = get_preset("gpt3-13b")
    plan = Plan("ssd", "ssd", "cpu", micro_batch_size=4, grad_accum=1, seq_len=1024, prefetch_depth=1)
    size = cost_model.sizes(model, plan)
    p1, p3 = predict(model, plan, TESTBED), predict(model, plan.replace(prefetch_depth=3), TESTBED)
    assert p3.gpu_peak_bytes - p1.gpu_peak_bytes == 2 * size.block_param_bytes  # one more block per depth
    N, L = model.num_parameters(), model.num_layers
    assert p1.ssd_bytes == 12 * N + L * size.block_param_bytes
    resident = predict(model, plan.replace(params="gpu", optimizer="cpu", activations="gpu"), TESTBED)
    assert resident.gpu_peak_bytes > 26 * GiB  # 13B bf16 weights alone
    assert resident.cpu_peak_bytes >= 16 * N  # fp32 gradient sum + optimizer state


@pytest.mark.parametrize("params, optimizer, activations", [("ssd", "ssd", "ssd"), ("cpu", "ssd", "cpu"), ("cpu", "cpu", "cpu")])
def test_more_ssds_or_more_pcie_never_slower(params, optimizer, activations):
    model = get_preset("gpt3-13b")
    for micro in (1, 8, 32):
        plan = Plan(params, optimizer, activations, micro_batch_size=micro, grad_accum=1, seq_len=1024)
        times = [predict(model, plan, TESTBED.replace(ssd_count=n)).iteration_s for n in (1, 2, 4, 8, 12, 24)]
        assert times == sorted(times, reverse=True)
        rates = [predict(model, plan, TESTBED.replace(h2d_gbps=r, d2h_gbps=r)).iteration_s for r in (4, 8, 16, 27.1, 64)]
        assert rates == sorted(rates, reverse=True)
    ssd_bound = Plan("ssd", "ssd", "ssd", micro_batch_size=1, grad_accum=1, seq_len=1024)
    assert predict(model, ssd_bound, TESTBED.replace(ssd_count=1)).iteration_s > 2 * predict(model, ssd_bound, TESTBED).iteration_s


def test_175b_prices_without_allocating():
    model = get_preset("gpt3-175b")
    p = predict(model, Plan("ssd", "ssd", "ssd", micro_batch_size=8, grad_accum=2, seq_len=1024), TESTBED)
    assert p.ssd_bytes > 12 * 170e9 and 0 < p.tflops < TESTBED.gpu_tflops


def test_plan_validation():
    with pytest.raises(ValueError, match="optimizer must be one of cpu, ssd"):
        Plan("cpu", "gpu", "cpu", micro_batch_size=1, grad_accum=1, seq_len=8)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        Plan("cpu", "cpu", "cpu", micro_batch_size=0, grad_accum=1, seq_len=8)
    plan = Plan("ssd", "cpu", "none", micro_batch_size=2, grad_accum=3, seq_len=8)
    assert plan.batch_size == 6 and plan.step_tokens == 48
    assert "train.grad_accum=3" in plan.config_overrides() and "offload.activations=none" in plan.config_overrides()
    assert dataclasses.is_dataclass(plan)


def test_cpu_passes_are_priced_at_the_memory_rate():
    """Micro-batches after the first add into the accumulator (12 B/param), several take a norm (4 B),
    every update publishes a cast (4 + 2 B for bf16 weights): all at cpu_memory_gbps, on the worker."""
    model = get_preset("tiny-gpt3").replace(num_layers=1)
    P_b = model.num_block_parameters()
    hw = ROUND.replace(cpu_memory_gbps=1.0)
    for k, expected_bytes in ((0, 0), (1, 12 * P_b), (2, 12 * P_b + 4 * P_b)):
        plan = Plan("cpu", "cpu", "cpu", micro_batch_size=2, grad_accum=3, seq_len=8)
        legs = cost_model.gradient_out_legs(model, plan, cost_model.sizes(model, plan), k)
        assert legs.cpu_bytes == expected_bytes and legs.d2h_bytes == 4 * P_b
    plan = Plan("cpu", "cpu", "cpu", micro_batch_size=2, grad_accum=1, seq_len=8)
    update = cost_model.block_update_legs(model, plan, cost_model.sizes(model, plan), 0)
    assert update.cpu_bytes == 6 * P_b
    assert leg_times(update, hw).optimizer_s == pytest.approx(P_b / 1e9 + 6 * P_b / 1e9)
    assert leg_times(update, ROUND).optimizer_s == pytest.approx(P_b / 1e9)  # no rate: not priced


def test_block_efficiency_slows_compute():
    model = get_preset("gpt3-1.3b")
    plan = Plan("cpu", "cpu", "cpu", micro_batch_size=4, grad_accum=1, seq_len=512)
    full = predict(model, plan, TESTBED)
    half = predict(model, plan, TESTBED.replace(block_efficiency=0.5))
    assert half.compute_busy_s == pytest.approx(2 * full.compute_busy_s)
    with pytest.raises(ConfigError, match="block_efficiency"):
        TESTBED.replace(block_efficiency=1.5)


def test_deferred_updates_move_the_cpu_leg_to_the_forward():
    """After a clipped step every update waits for the norm: it overlaps the next forward, not this backward."""
    model = get_preset("gpt3-1.3b")
    plan = Plan("cpu", "cpu", "cpu", micro_batch_size=1, grad_accum=1, seq_len=512)
    slow_cpu = TESTBED.replace(cpu_adam_gparams_per_s=0.05)  # the CPU leg dominates every stage
    overlapped = predict(model, plan, slow_cpu)
    deferred = predict(model, plan, slow_cpu, deferred_updates=True)
    update_s = model.num_block_parameters() / 0.05e9
    assert overlapped.backward_bottleneck == "optimizer" and deferred.forward_bottleneck == "optimizer"
    assert deferred.forward_s > overlapped.forward_s + 20 * update_s
    assert deferred.backward_s < overlapped.backward_s - 20 * update_s
    assert deferred.epilogue_s == pytest.approx(overlapped.epilogue_s)  # block 0's update: serial either way
    assert deferred.optimizer_busy_s == pytest.approx(overlapped.optimizer_busy_s)


def test_ssd_duplex_rate_prices_reads_and_writes_in_flight_together():
    """max(r / read, w / write, (r + w) / duplex) per drive, striped over ssd_count; no duplex: r/read + w/write."""
    legs = Legs(ssd_read_bytes=4e9, ssd_write_bytes=2e9)  # ROUND: 2 drives of 1.0 read, 0.5 write GB/s
    assert leg_times(legs, ROUND).ssd_s == pytest.approx(4 / 2 + 2 / 1)  # they take turns
    assert leg_times(legs, ROUND.replace(ssd_duplex_gbps=1.2)).ssd_s == pytest.approx(6 / 2.4)  # mixed rate binds
    assert leg_times(legs, ROUND.replace(ssd_duplex_gbps=10.0)).ssd_s == pytest.approx(max(4 / 2, 2 / 1))  # lanes
    reads_only = Legs(ssd_read_bytes=4e9)
    assert leg_times(reads_only, ROUND.replace(ssd_duplex_gbps=1.2)).ssd_s == pytest.approx(4 / 2)


def test_the_cpu_worker_is_priced_at_its_rates_under_load_where_measured():
    legs = Legs(optimizer_params=2e9, cpu_bytes=6e9)
    alone = ROUND.replace(cpu_memory_gbps=3.0)
    assert leg_times(legs, alone).optimizer_s == pytest.approx(2 / 1.0 + 6 / 3.0)
    loaded = alone.replace(cpu_adam_loaded_gparams_per_s=0.8, cpu_memory_loaded_gbps=2.0)
    assert leg_times(legs, loaded).optimizer_s == pytest.approx(2 / 0.8 + 6 / 2.0)
    with pytest.raises(ConfigError, match="cpu_adam_loaded_gparams_per_s"):
        ROUND.replace(cpu_adam_loaded_gparams_per_s=0.0)
    # a clipped update's AdamW at the clipped rate where measured, else at the unclipped one
    assert leg_times(legs, loaded, clipped=True).optimizer_s == pytest.approx(2 / 0.8 + 6 / 2.0)
    clipped = loaded.replace(cpu_adam_clipped_loaded_gparams_per_s=0.5)
    assert leg_times(legs, clipped).optimizer_s == pytest.approx(2 / 0.8 + 6 / 2.0)
    assert leg_times(legs, clipped, clipped=True).optimizer_s == pytest.approx(2 / 0.5 + 6 / 2.0)


def test_deferred_updates_are_priced_at_the_clipped_adamw_rate():
    """Deferred updates belong to clipped steps, whose AdamW folds the clip factor in (a slower kernel)."""
    model = get_preset("gpt3-1.3b")
    plan = Plan("cpu", "cpu", "cpu", micro_batch_size=1, grad_accum=1, seq_len=512)
    slow_cpu = TESTBED.replace(cpu_adam_gparams_per_s=0.05)
    clipped_slower = slow_cpu.replace(cpu_adam_clipped_loaded_gparams_per_s=0.025)
    assert predict(model, plan, clipped_slower).iteration_s == pytest.approx(predict(model, plan, slow_cpu).iteration_s)
    deferred, deferred_slower = (predict(model, plan, hw, deferred_updates=True) for hw in (slow_cpu, clipped_slower))
    assert deferred_slower.optimizer_busy_s == pytest.approx(2 * deferred.optimizer_busy_s, rel=0.05)
