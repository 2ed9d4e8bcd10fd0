"""The optimizer state split per block between RAM and the SSD (`Plan.optimizer_cpu_blocks`) and the gradient
ring in the cost model and the planner: SSD traffic, time and memory against K, the splits the planner picks on
the H100 box, and agreement with the runtime's own memory check (`fuyou.runtime.memory_need`)."""

from pathlib import Path

import pytest
import torch

from fuyou.cli import main
from fuyou.errors import ConfigError
from fuyou.models import build_model, get_preset
from fuyou.plan import HardwareProfile, Plan, predict
from fuyou.plan.cost_model import GiB, gradient_ring_buffers
from fuyou.plan.planner import PlanError, choose_plan
from fuyou.runtime import Placement, memory_need

ROOT = Path(__file__).parent.parent
H100 = HardwareProfile.from_yaml(ROOT / "configs" / "hardware" / "h100-box.yaml")
GPT3_10B = get_preset("gpt3-13b").replace(num_layers=32)  # issue 4's largest model, 10.3B


def _runtime_need(model, plan: Plan, gradient_ring: int):
    """The runtime's memory check for `plan`, on a model built on "meta" (shapes only)."""
    placement = Placement(plan.params, plan.optimizer, plan.activations, plan.optimizer_cpu_blocks)
    return memory_need(build_model(model, device="meta"), placement, block_dtype=torch.bfloat16, gradient_ring=gradient_ring,
                       activation_numel=plan.micro_batch_tokens * model.hidden_size)


def test_split_validation_describe_and_overrides():
    with pytest.raises(ConfigError, match="needs optimizer ssd"):
        Plan("cpu", "cpu", "cpu", micro_batch_size=1, grad_accum=1, seq_len=8, optimizer_cpu_blocks=2)
    with pytest.raises(ConfigError, match=">= 0"):
        Plan("cpu", "ssd", "cpu", micro_batch_size=1, grad_accum=1, seq_len=8, optimizer_cpu_blocks=-1)
    plan = Plan("cpu", "ssd", "cpu", micro_batch_size=1, grad_accum=1, seq_len=8, optimizer_cpu_blocks=16)
    assert "offload.optimizer_cpu_blocks=16" in plan.config_overrides()
    assert "blocks 0-15 and embeddings/head in RAM" in plan.describe()
    assert not any("optimizer_cpu_blocks" in o for o in plan.replace(optimizer_cpu_blocks=None).config_overrides())
    # the runtime's rule: the outer group and blocks below K in RAM
    assert [plan.optimizer_tier(j) for j in (None, 0, 15, 16, 23)] == ["cpu", "cpu", "cpu", "ssd", "ssd"]
    assert plan.replace(optimizer_cpu_blocks=None).optimizer_tier(None) == "ssd"


def test_more_blocks_in_ram_mean_fewer_ssd_bytes_less_time_and_12_bytes_per_param_more_ram():
    model = get_preset("gpt3-1.3b")
    L, P_b = model.num_layers, model.num_block_parameters()
    base = Plan("cpu", "ssd", "cpu", micro_batch_size=8, grad_accum=1, seq_len=2048, prefetch_depth=2)
    splits = [predict(model, base.replace(optimizer_cpu_blocks=k), H100) for k in range(L + 1)]
    for fewer, more in zip(splits, splits[1:]):
        assert more.ssd_traffic_bytes == fewer.ssd_traffic_bytes - 2 * 12 * P_b  # one block's state read + written less
        assert more.ssd_bytes == fewer.ssd_bytes - 12 * P_b
        assert more.iteration_s <= fewer.iteration_s
    for k in range(L - 1):  # below L at least one block stays on the SSD: its in-flight buffers are constant
        assert splits[k + 1].cpu_peak_bytes - splits[k].cpu_peak_bytes == 12 * P_b
    assert splits[-1].ssd_traffic_bytes == 0 and splits[-1].iteration_s < splits[0].iteration_s / 5
    # without a split the outer group's state (embeddings and head) moves through the SSD too
    everything = predict(model, base, H100)
    assert everything.ssd_traffic_bytes == splits[0].ssd_traffic_bytes + 2 * 12 * (model.num_parameters() - L * P_b)
    assert everything.iteration_s >= splits[0].iteration_s


def test_gradient_ring_replaces_the_accumulator_only_in_memory():
    model = get_preset("gpt3-1.3b")
    plan = Plan("cpu", "cpu", "cpu", micro_batch_size=8, grad_accum=1, seq_len=2048)
    full, ring = predict(model, plan, H100), predict(model, plan, H100, gradient_ring=4)
    widest = max(model.num_block_parameters(), model.num_parameters() - model.num_layers * model.num_block_parameters())
    assert full.cpu_peak_bytes - ring.cpu_peak_bytes == 4 * model.num_parameters() - 4 * 4 * widest
    assert ring.iteration_s == full.iteration_s
    assert gradient_ring_buffers(4, grad_accum=1, clipping=False) == 4
    assert gradient_ring_buffers(4, grad_accum=2, clipping=False) == gradient_ring_buffers(4, grad_accum=1, clipping=True) == 0


def test_planner_splits_gpt3_1_3b_under_24_gib_as_the_runtime_would():
    """ssd-1.3b's setting: 24 GiB of RAM, weights and activations there, 8 x 2048 a pass. Every state in RAM
    does not fit; the planner takes the split with the most blocks in RAM, which the runtime's check accepts."""
    model = get_preset("gpt3-1.3b")
    args = dict(batch_size=8, seq_len=2048, cpu_memory_gb=24, gpu_memory_gb=24, params="cpu", activations="cpu", micro_batch_size=8)
    chosen = choose_plan(model, H100, **args)
    K = chosen.plan.optimizer_cpu_blocks
    assert chosen.plan.optimizer == "ssd" and 0 < K < model.num_layers
    assert chosen.cpu_peak_bytes <= 24 * GiB < predict(model, chosen.plan.replace(optimizer_cpu_blocks=K + 1), H100).cpu_peak_bytes
    need = _runtime_need(model, chosen.plan, gradient_ring=0)
    assert need.cpu_bytes <= 24 * GiB and abs(need.cpu_bytes - chosen.cpu_peak_bytes) < 2 * GiB
    assert need.ssd_bytes == pytest.approx(chosen.ssd_bytes, rel=0.01)
    all_on_ssd = predict(model, chosen.plan.replace(optimizer_cpu_blocks=None), H100)
    assert chosen.iteration_s < all_on_ssd.iteration_s / 2  # the run measured 5x


def test_planner_fits_the_10b_shape_on_the_h100_box_with_a_split_and_the_ring():
    """Issue 4's largest model: 124 GB of optimizer state fits neither the 110 GiB of RAM nor the 59 GiB disk."""
    args = dict(batch_size=16, seq_len=2048, activations="none")
    with pytest.raises(PlanError, match="short by"):  # with clipping there is no ring: a 4 B/param accumulator
        choose_plan(GPT3_10B, H100, **args, optimizer="cpu")
    chosen = choose_plan(GPT3_10B, H100, **args, gradient_ring=4, clipping=False)
    plan, L = chosen.plan, GPT3_10B.num_layers
    assert plan.optimizer == "ssd" and plan.grad_accum == 1 and 0 < plan.optimizer_cpu_blocks < L
    assert chosen.cpu_peak_bytes <= H100.cpu_memory_gb * GiB and chosen.ssd_bytes <= H100.ssd_capacity_gb * GiB
    # the runtime's own check agrees and accepts the same K (memory_need: K from SSD-bound to RAM-bound)
    need = _runtime_need(GPT3_10B, plan, gradient_ring=4)
    assert abs(need.cpu_bytes - chosen.cpu_peak_bytes) < 3 * GiB and abs(need.ssd_bytes - chosen.ssd_bytes) < 1 * GiB
    assert need.cpu_bytes <= H100.cpu_memory_gb * GiB and need.ssd_bytes <= H100.ssd_capacity_gb * GiB
    one_more = _runtime_need(GPT3_10B, plan.replace(optimizer_cpu_blocks=plan.optimizer_cpu_blocks + 1), gradient_ring=4)
    assert one_more.cpu_bytes > H100.cpu_memory_gb * GiB  # the largest K that fits


def test_an_explicit_split_is_kept_and_checked():
    args = dict(batch_size=16, seq_len=2048, activations="none", gradient_ring=4, clipping=False)
    fixed = choose_plan(GPT3_10B, H100, **args, optimizer_cpu_blocks=20)  # the split the device run used
    assert fixed.plan.optimizer_cpu_blocks == 20 and fixed.plan.optimizer == "ssd"
    with pytest.raises(PlanError, match="SSD space short by"):  # 32 - 4 blocks' state is more than the disk
        choose_plan(GPT3_10B, H100, **args, optimizer_cpu_blocks=4)
    with pytest.raises(PlanError, match="use 0 to 32"):
        choose_plan(GPT3_10B, H100, **args, optimizer_cpu_blocks=33)


def test_fuyou_plan_on_the_10b_config(capsys):
    """`fuyou plan` reads the ring and clipping from the config and emits the split in its overrides."""
    args = ["plan", "--config", str(ROOT / "configs" / "tiny.yaml"), "model.preset=gpt3-13b", "model.num_layers=32",
            "runtime=fuyou", "device=cuda", "train.precision=bf16", "train.batch_size=16", "train.seq_len=2048",
            "train.max_grad_norm=null", "offload.activations=none", "--hardware", str(ROOT / "configs" / "hardware" / "h100-box.yaml")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "offload.optimizer_cpu_blocks=" in text and "after clip" not in text
    assert main(args[:-2] + ["offload.optimizer_cpu_blocks=18", "offload.params=cpu"] + args[-2:]) == 0
    assert "offload.optimizer_cpu_blocks=18" in capsys.readouterr().out


def test_plan_check_reads_the_split_from_a_result():
    """benchmarks.plan_check prices a result's split (offload.optimizer_cpu_blocks) as the run placed it."""
    from benchmarks.plan_check import compare
    from benchmarks.run import CASES

    case = next(c for c in CASES if c.name == "fuyou-1.3b-split-b8-ga1")
    result = {"case": case.name, "command": case.command(),
              "metrics": {"tokens_per_s": 1000.0, "peak_gpu_bytes": 20 * GiB, "peak_cpu_bytes": 23 * GiB}}
    row = compare(result, H100)
    assert row["plan"].startswith("params cpu, optimizer ssd (blocks 0-15 and embeddings/head in RAM)")
    everything_on_ssd = compare(result | {"command": case.command().replace(" offload.optimizer_cpu_blocks=16", "")}, H100)
    assert row["predicted_s"] < everything_on_ssd["predicted_s"] and row["predicted_cpu_gib"] > everything_on_ssd["predicted_cpu_gib"]
