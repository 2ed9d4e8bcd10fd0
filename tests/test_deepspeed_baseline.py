"""The DeepSpeed baselines' config builder, metrics and comparison plumbing on the CPU; the DeepSpeed run
itself needs CUDA (marked gpu)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import compare, deepspeed_baseline
from benchmarks.deepspeed_baseline import (
    AIO_DEFAULTS,
    deepspeed_config,
    io_delta,
    swap_file_bytes,
    throughput,
)
from benchmarks.run import CASES
from fuyou.config import TrainConfig
from fuyou.models import build_model
from fuyou.models.presets import get_preset
from fuyou.reference import causal_lm_loss_sum


def test_zero_infinity_config_swaps_weights_and_optimizer_to_nvme(tmp_path):
    config = deepspeed_config("zero-infinity", batch_size=8, grad_accum=2, lr=1e-4, nvme_dir=str(tmp_path),
                              largest_param_numel=131_000_000)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    for section in ("offload_param", "offload_optimizer"):
        assert zero[section]["device"] == "nvme"
        assert zero[section]["nvme_path"] == str(tmp_path)
        assert zero[section]["pin_memory"] is True
    assert zero["offload_param"]["max_in_cpu"] == 0  # nothing kept in RAM: the run must swap
    # The pipelined optimizer swapper runs out of buffers below ~12 (see the module docstring).
    assert zero["offload_optimizer"]["pipeline_read"] and zero["offload_optimizer"]["buffer_count"] >= 12
    unpipelined = deepspeed_config("zero-infinity", batch_size=8, grad_accum=2, lr=1e-4, nvme_dir=str(tmp_path), pipeline=False)
    assert not unpipelined["zero_optimization"]["offload_optimizer"]["pipeline_write"]
    # DeepSpeed refuses a parameter buffer smaller than the largest parameter (the tied embedding).
    assert zero["offload_param"]["buffer_size"] >= 131_000_000
    assert zero["offload_param"]["buffer_size"] % (1 << 20) == 0
    assert config["aio"] == {
        "block_size": AIO_DEFAULTS.block_size,
        "queue_depth": AIO_DEFAULTS.queue_depth,
        "intra_op_parallelism": AIO_DEFAULTS.intra_op_parallelism,  # the key 0.19 reads, not thread_count
        "single_submit": False,
        "overlap_events": True,
    }
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 2
    assert config["bf16"] == {"enabled": True}
    assert config["optimizer"]["type"] == "AdamW"
    assert config["gradient_clipping"] == 1.0
    json.dumps(config)  # DeepSpeed takes it as JSON-able dict


def test_small_model_keeps_the_default_parameter_buffer(tmp_path):
    config = deepspeed_config("zero-infinity", batch_size=1, grad_accum=1, lr=1e-4, nvme_dir=str(tmp_path), largest_param_numel=10)
    assert config["zero_optimization"]["offload_param"]["buffer_size"] == 100_000_000


def test_zero_offload_config_keeps_the_optimizer_in_pinned_ram():
    config = deepspeed_config("zero-offload", batch_size=4, grad_accum=1, lr=1e-4)
    zero = config["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero and "aio" not in config


def test_config_refuses_unknown_mode_and_nvme_without_a_directory():
    with pytest.raises(ValueError, match="nvme-dir"):
        deepspeed_config("zero-infinity", batch_size=1, grad_accum=1, lr=1e-4)
    with pytest.raises(ValueError, match="zero-infinity, zero-offload"):
        deepspeed_config("pytorch", batch_size=1, grad_accum=1, lr=1e-4)


def test_throughput_leaves_out_the_first_step_and_counts_recompute():
    # 1e9 parameters, 16384 tokens per step; steps 2 and 3 take 2 s and 4 s -> mean 3 s.
    rates = throughput(1_000_000_000, 16384, [100.0, 2.0, 4.0])
    assert rates["mean_step_s"] == pytest.approx(3.0)
    assert rates["tokens_per_s"] == pytest.approx(16384 / 3)
    assert rates["model_tflops"] == pytest.approx(6e9 * 16384 / 3 / 1e12)
    assert rates["hardware_tflops"] == pytest.approx(rates["model_tflops"] * 8 / 6)
    assert throughput(10, 100, [5.0])["mean_step_s"] == 5.0  # one step: nothing to leave out


def test_io_helpers(tmp_path):
    assert io_delta({"read_bytes": 5, "write_bytes": 7}, {"read_bytes": 9, "write_bytes": 7, "new": 1}) == {
        "read_bytes": 4, "write_bytes": 0}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "swap.tensor.swp").write_bytes(b"x" * 8192)
    files = swap_file_bytes(tmp_path)
    assert files["files"] == 1 and files["apparent_bytes"] == 8192 and files["allocated_bytes"] >= 0
    assert swap_file_bytes(tmp_path / "missing")["files"] == 0
    if os.path.exists("/proc/self/io"):
        assert "write_bytes" in deepspeed_baseline.proc_io()


def test_baseline_wrapper_computes_the_models_loss_in_chunks():
    """Chunked, checkpointed head: the same loss and gradients as the model's plain forward."""
    model = build_model(get_preset("tiny-gpt3"), seed=0)
    wrapped = deepspeed_baseline.checkpointed_module(model, head_chunk_tokens=32)  # 2 rows of 16 per chunk
    input_ids_BS, labels_BS = torch.randint(0, 512, (5, 16)), torch.randint(0, 512, (5, 16))
    expected = causal_lm_loss_sum(model(input_ids_BS), labels_BS)
    expected.backward()
    expected_grads = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    loss = wrapped(input_ids_BS, labels_BS)
    torch.testing.assert_close(loss, expected)
    loss.backward()  # re-entrant checkpointing still reaches every parameter
    for parameter, grad in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(parameter.grad, grad)


def test_pytorch_mode_reports_does_not_fit_without_running(tmp_path, monkeypatch):
    """gpt3-2.7b needs 16 B/param = 42 GB > 24 GiB: reported with the bytes, nothing allocated."""
    args = deepspeed_baseline.parse_args(["--mode", "pytorch", "--preset", "gpt3-2.7b"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 << 30}))
    result = deepspeed_baseline.run(args)
    assert result["fits"] is False
    assert result["need_bytes"] == 16 * get_preset("gpt3-2.7b").num_parameters()


@pytest.mark.parametrize("comparison", compare.COMPARISONS, ids=lambda c: c.name)
def test_comparisons_match_their_fuyou_case(comparison):
    """Both sides of a comparison train the same shape, sequences per step and number of steps."""
    case = {case.name: case for case in CASES}[comparison.fuyou_case]
    config = TrainConfig.from_yaml(case.config, case.overrides)
    assert config.model.preset == comparison.preset
    fuyou_batch = comparison.fuyou_batch or (comparison.batch_size, comparison.grad_accum)
    assert (config.train.batch_size, config.train.grad_accum, config.train.seq_len, config.train.steps) == (
        *fuyou_batch, comparison.seq_len, comparison.steps)
    assert fuyou_batch[0] * fuyou_batch[1] == comparison.batch_size * comparison.grad_accum  # same sequences per step
    assert config.offload.gpu_memory_gb == comparison.gpu_memory_gb
    assert comparison.baseline in comparison.baselines
    assert set(comparison.baselines) <= set(deepspeed_baseline.MODES)


def test_ratios_and_table():
    metrics = {
        "fuyou": {"status": "ok", "model_tflops": 30.0, "mean_step_s": 1.0, "tokens_per_s": 1000.0, "hardware_tflops": 40.0,
                  "peak_rss_bytes": 1 << 30, "ssd_read_bytes_per_step": 1e9, "ssd_write_bytes_per_step": 2e9},
        "zero-infinity": {"status": "ok", "model_tflops": 10.0, "mean_step_s": 3.0, "tokens_per_s": 333.0, "hardware_tflops": 13.3,
                          "peak_rss_bytes": 1 << 30, "ssd_read_bytes_per_step": 3e9, "ssd_write_bytes_per_step": 3e9},
        "pytorch": {"status": "does not fit", "need_bytes": 42 << 30, "peak_rss_bytes": 0},
    }
    ratio = compare.fuyou_ratios(metrics)
    assert ratio == {"zero-infinity": pytest.approx(3.0), "pytorch": None}
    table = compare.comparison_table([{"case": "ssd-x", "metrics": metrics, "ratio": ratio}])
    assert "| ssd-x | zero-infinity | ok |" in table and "3.00×" in table and "needs 42.0 GiB" in table


def test_run_child_reports_exit_code_rss_and_timeout(tmp_path):
    code, wall_s, rss = compare.run_child([sys.executable, "-c", "print('hi')"], 30, tmp_path / "log")
    assert code == 0 and rss > 0 and (tmp_path / "log").read_text() == "hi\n"
    code, wall_s, _ = compare.run_child([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, tmp_path / "log2")
    assert code == "timeout" and wall_s < 10


def test_setup_script_parses():
    subprocess.run(["bash", "-n", "benchmarks/device/setup_deepspeed.sh"], check=True)


@pytest.mark.gpu
def test_zero_infinity_runs_and_writes_to_disk(tmp_path):
    """Two steps of a 2-layer GPT-3 125M shape under ZeRO-Infinity: finite losses, swap files on disk."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, "-m", "benchmarks.deepspeed_baseline", "--mode", "zero-infinity", "--preset", "gpt3-125m",
                    "--num-layers", "2", "--batch-size", "2", "--seq-len", "256", "--steps", "2",
                    "--nvme-dir", str(tmp_path / "nvme"), "--json-out", str(out)], check=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["fits"] and all(torch.isfinite(torch.tensor(step["loss"])) for step in result["steps"])
    assert result["swap_files"]["apparent_bytes"] > 0


def test_fuyou_rate_comes_from_its_measured_window():
    """Per-step times can move a deferred step's updates into the next step; the drained window cannot."""
    steps = [{"step": 1, "step_s": 7.0}, {"step": 2, "step_s": 0.5, "io": {"read_bytes": 0}},
             {"step": 3, "step_s": 15.9, "io": {"read_bytes": 16e9}}]
    window = {"steps": 2, "tokens_per_s": 1000.0, "ssd_read_bytes": 32e9, "ssd_write_bytes": 30e9}
    result = {"parameters": 10**9, "steps": steps, "command": "fuyou train ...",
              "metrics": {"tokens": 3 * 16384, "steps": 3, "peak_gpu_bytes": 1, "measurement": window}}
    metrics = compare.fuyou_metrics(result)
    assert metrics["tokens_per_s"] == pytest.approx(1000.0)
    assert metrics["mean_step_s"] == pytest.approx(16.384)
    assert metrics["model_tflops"] == pytest.approx(6 * 1e9 * 1000 / 1e12)
    assert metrics["ssd_read_bytes_per_step"] == pytest.approx(16e9) and metrics["ssd_write_bytes_per_step"] == pytest.approx(15e9)
    del result["metrics"]["measurement"]  # no window: the per-step mean after step 1
    assert compare.fuyou_metrics(result)["mean_step_s"] == pytest.approx((0.5 + 15.9) / 2)
