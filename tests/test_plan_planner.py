"""The planner picks a feasible, fastest plan and rejects an infeasible request naming the short resource;
`fuyou plan` and `fuyou probe` end to end."""

import json
from pathlib import Path

import pytest

from fuyou.cli import main
from fuyou.models import get_preset
from fuyou.plan import HardwareProfile
from fuyou.plan.cost_model import GiB
from fuyou.plan.planner import PlanError, choose_plan

ROOT = Path(__file__).parent.parent
TESTBED = HardwareProfile.from_yaml(ROOT / "configs" / "hardware" / "rtx4090-12ssd.yaml")
H100 = HardwareProfile.from_yaml(ROOT / "configs" / "hardware" / "h100-box.yaml")


def test_picks_a_feasible_plan_within_the_caps():
    p = choose_plan(get_preset("gpt3-13b"), TESTBED, batch_size=32, seq_len=1024, gpu_memory_gb=24)
    assert p.gpu_peak_bytes <= 24 * GiB and p.cpu_peak_bytes <= TESTBED.cpu_memory_gb * GiB
    assert p.plan.batch_size == 32 and p.plan.params != "gpu"  # 26 GB of bf16 weights cannot stay on a 24 GB GPU
    # Megatron's count credits a whole recompute, which the runtime trims: only executed FLOPs meet the peak
    assert 100 < p.hardware_tflops <= TESTBED.gpu_tflops < p.megatron_tflops


def test_fixed_placements_are_respected_and_tight_ram_moves_state_to_ssd():
    model = get_preset("gpt3-13b")
    fixed = choose_plan(model, TESTBED, batch_size=8, seq_len=1024, params="ssd", optimizer="ssd", activations="ssd")
    assert (fixed.plan.params, fixed.plan.optimizer, fixed.plan.activations) == ("ssd", "ssd", "ssd")
    tight = choose_plan(model, TESTBED, batch_size=8, seq_len=1024, cpu_memory_gb=96)
    assert tight.plan.optimizer == "ssd" and tight.cpu_peak_bytes <= 96 * GiB


def test_rejects_an_infeasible_request_naming_the_short_resource():
    with pytest.raises(PlanError) as error:
        choose_plan(get_preset("gpt3-13b"), TESTBED, batch_size=8, seq_len=1024, gpu_memory_gb=1)
    message = str(error.value)
    assert message.startswith("infeasible: GPU memory short by ") and "GiB" in message and "\n" not in message
    with pytest.raises(PlanError, match=r"infeasible: (CPU memory|SSD space) short by \d+\.\d GiB"):
        # 32 GiB: under 24 even one block in flight with the fp32 outer group and fp32 checkpoints is short too
        choose_plan(get_preset("gpt3-175b"), H100, batch_size=8, seq_len=1024, gpu_memory_gb=32)
    no_ssd = TESTBED.replace(ssd_count=0, ssd_read_gbps=0.0, ssd_write_gbps=0.0)
    with pytest.raises(PlanError, match="SSD space short by"):
        choose_plan(get_preset("gpt3-1.3b"), no_ssd, batch_size=8, seq_len=1024, optimizer="ssd")


def test_more_ssds_never_make_the_chosen_plan_slower():
    model = get_preset("gpt3-13b")
    times = [choose_plan(model, TESTBED.replace(ssd_count=n), batch_size=16, seq_len=1024, cpu_memory_gb=128).iteration_s
             for n in (1, 2, 4, 12)]
    assert times == sorted(times, reverse=True) and times[0] > times[-1]


def test_fuyou_internals_swapping_never_hurts_and_batch_search():
    model = get_preset("gpt3-1.3b")
    plain = choose_plan(model, TESTBED, batch_size=16, seq_len=1024, gpu_memory_gb=24)
    fuyou = choose_plan(model, TESTBED, batch_size=16, seq_len=1024, gpu_memory_gb=24, swap_internals=True)
    assert fuyou.iteration_s <= plain.iteration_s
    searched = choose_plan(model, TESTBED, batch_size=64, seq_len=1024, gpu_memory_gb=24, search_batch=True)
    assert searched.plan.batch_size in (1, 2, 4, 8, 16, 32, 64)
    assert searched.tokens_per_s * 1.01 >= plain.tokens_per_s


def test_fuyou_plan_json_on_the_13b_config(capsys):
    code = main(["plan", "--config", str(ROOT / "configs" / "gpt3-13b.yaml"),
                 "--hardware", str(ROOT / "configs" / "hardware" / "rtx4090-12ssd.yaml"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feasible"] is True
    assert 5 < out["iteration_s"] < 60  # 32 x 1024 tokens of 13B: about 20 s at ~160 TFLOPS
    assert 80 < out["tflops"] < 165 and out["hardware_tflops"] <= 165.2 + 1e-6
    assert out["peak_gib"]["gpu"] <= 24 and out["plan"]["batch_size"] == 32
    # after a clipped step the updates overlap the (shorter) forward instead of the backward: never faster
    assert out["iteration_s_after_clip"] >= out["iteration_s"] - 1e-9


def test_fuyou_plan_text_and_an_infeasible_json(capsys):
    args = ["plan", "--config", str(ROOT / "configs" / "gpt3-13b.yaml"), "--hardware",
            str(ROOT / "configs" / "hardware" / "rtx4090-12ssd.yaml")]
    assert main(args) == 0
    text = capsys.readouterr().out
    for word in ("placement", "iteration", "after clip", "compute", "PCIe", "SSD", "CPU optimizer", "TFLOPS", "peak memory"):
        assert word in text
    assert main(args + ["offload.gpu_memory_gb=1", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["feasible"] is False and "GPU memory short by" in out["error"]


def test_fuyou_probe_quick_writes_a_loadable_profile(tmp_path, capsys):
    output = tmp_path / "hw.yaml"
    assert main(["probe", "--quick", "--ssd-dir", str(tmp_path / "ssd"), "--output", str(output)]) == 0
    profile = HardwareProfile.from_yaml(output)
    assert profile.gpu_tflops > 0 and profile.cpu_adam_gparams_per_s > 0 and profile.ssd_read_gbps > 0
    assert profile.ssd_count == 1 and profile.source.startswith("fuyou probe --quick")
    assert profile.ssd_duplex_gbps > 0  # reads and writes at once, measured on every machine
    if profile.compute_device == "cpu":
        assert profile.gpu_fp8_tflops == 0 and "no CUDA GPU" in profile.source
        # the worker's rates under the runtime's load need a GPU to make that load
        assert profile.cpu_adam_loaded_gparams_per_s is None and profile.cpu_memory_loaded_gbps is None
        assert profile.cpu_adam_clipped_loaded_gparams_per_s is None
    else:
        assert profile.cpu_adam_loaded_gparams_per_s > 0 and profile.cpu_memory_loaded_gbps > 0
        assert profile.cpu_adam_clipped_loaded_gparams_per_s > 0
    # and the planner runs on what it measured (a tiny model: this CPU machine cannot hold much more)
    assert main(["plan", "--config", str(ROOT / "configs" / "tiny.yaml"), "--hardware", str(output), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["feasible"] is True


def test_published_comparison_compute_bound_end_stays_within_the_goal():
    """benchmarks/fuyou_published.md: the compute-bound batches within +-15% of Fuyou's published TFLOPS."""
    from benchmarks.published import CASES, FUYOU_PLACEMENT, predict_case

    for case in CASES:
        if case.batch_size >= 32:
            p = predict_case(case, TESTBED, FUYOU_PLACEMENT)
            assert abs(p.megatron_tflops / case.published_tflops - 1) < 0.15, case
    assert "| 64 | 155.8 |" in (ROOT / "benchmarks" / "fuyou_published.md").read_text()


def test_plan_check_parses_a_result_back_into_a_plan():
    """benchmarks.plan_check (check 1 on the GPU machine): a result's command -> fixed Plan -> prediction."""
    from benchmarks.plan_check import CASES, compare

    case = next(c for c in CASES if "ssd" in c.name)
    result = {"case": case.name, "command": case.command(),
              "metrics": {"tokens_per_s": 1000.0, "peak_gpu_bytes": 20 * GiB, "peak_cpu_bytes": 60 * GiB}}
    row = compare(result, H100)
    assert row["plan"].startswith("params cpu, optimizer ssd, activations cpu") and row["predicted_s"] > 0
    assert row["measured_s"] == pytest.approx(int(case.name.split("-b")[-1]) * 2048 / 1000.0)
