"""`fuyou profile` on the CPU: the files exist, parse, and their figures agree with each other and with the model."""

import csv
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fuyou import measure
from fuyou.cli import main
from fuyou.measure import flops_per_token
from fuyou.models import get_preset

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
BATCH, SEQ = 2, 32
SMALL = [f"train.batch_size={BATCH}", f"train.seq_len={SEQ}"]
QUICK = ["--warmup", "1", "--steps", "2", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def profile(tmp_path, *overrides, options=()):
    out = tmp_path / "profile"
    code = main(["profile", "--config", TINY, *SMALL, *overrides, *QUICK, *options, "--output", str(out)])
    assert code == 0
    return out


def chrome_lanes(trace: dict) -> dict[str, int]:
    """Lane name -> number of complete events on it."""
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    counts = dict.fromkeys(names.values(), 0)
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            assert {"name", "ts", "dur", "pid", "tid"} <= set(event) and event["dur"] >= 0 and event["ts"] >= 0
            counts[names[event["tid"]]] += 1
    return counts


def test_fuyou_ssd_profile_files_are_complete_and_consistent(tmp_path, capsys):
    out = profile(tmp_path, "runtime=fuyou", "offload.optimizer=ssd", f"offload.ssd_dir={tmp_path}")
    assert "tokens/s" in capsys.readouterr().out
    report = json.loads((out / "profile.json").read_text())
    m = report["measurement"]

    model = get_preset("tiny-llama")
    N = model.num_parameters()
    assert m["num_parameters"] == N
    assert m["steps"] == 2 and m["tokens"] == 2 * BATCH * SEQ == sum(s["step_tokens"] for s in report["steps"])
    assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["seconds"])
    assert m["s_per_10k_tokens"] == pytest.approx(1e4 / m["tokens_per_s"])
    assert m["model_tflops"] == pytest.approx(6 * N * m["tokens"] / m["seconds"] / 1e12)
    # runtime=fuyou recomputes every block's forward once (checkpointed inputs on the CPU), all but its down projection
    per_token = 6 * N + 2 * model.num_layers * (model.num_block_parameters() - model.ffn_size * model.hidden_size)
    assert m["hardware_flops_per_token"] == per_token
    assert m["hardware_tflops"] == pytest.approx(per_token * m["tokens"] / m["seconds"] / 1e12)
    assert m["utilisation"] is None and m["pinned_peak_bytes"] > 0 and m["peak_cpu_rss_bytes"] > 0
    assert m["ssd_read_bytes"] > 0 and m["ssd_write_bytes"] > 0
    if not torch.cuda.is_available():
        assert m["energy_j"] is None and m["energy_reason"] == "no NVIDIA GPU"
        assert m["peak_gpu_allocated_bytes"] is None

    with (out / "profile.csv").open() as file:
        (row,) = list(csv.DictReader(file))
    assert set(row) == set(m)
    for key, value in m.items():
        if value is None:
            assert row[key] == ""
        elif isinstance(value, str):
            assert row[key] == value
        else:
            assert float(row[key]) == pytest.approx(value, rel=1e-12), key

    assert (out / "timeline.png").read_bytes().startswith(PNG_MAGIC)
    lanes = report["timeline"]["lanes"]
    events = chrome_lanes(json.loads((out / "trace.json").read_text()))
    for lane in ("compute", "SSD read", "SSD write", "CPU optimizer"):
        assert events[lane] > 0 and lanes[lane]["spans"] == events[lane], lane
        assert 0 < lanes[lane]["busy_fraction"] <= 1
    assert events["compute"] >= 2 * model.num_layers  # a forward and a backward span per block
    # the timeline is one of the measured steps: at most what all of them moved
    assert 0 < lanes["SSD read"]["bytes"] <= m["ssd_read_bytes"]
    assert 0 < lanes["SSD write"]["bytes"] <= m["ssd_write_bytes"]


def test_reference_runtime_has_only_a_compute_lane(tmp_path):
    out = profile(tmp_path, "runtime=reference")
    report = json.loads((out / "profile.json").read_text())
    assert list(report["timeline"]["lanes"]) == ["compute"] and "reference" in report["timeline"]["note"]
    assert chrome_lanes(json.loads((out / "trace.json").read_text())) == {"compute": 1}
    m = report["measurement"]
    assert m["ssd_read_bytes"] is None and m["pinned_peak_bytes"] is None and m["cpu_optimizer_busy_s"] is None
    assert m["hardware_tflops"] == pytest.approx(m["model_tflops"])  # no checkpointing: nothing recomputed
    assert (out / "timeline.png").read_bytes().startswith(PNG_MAGIC)


def test_hardware_flops_count_the_recomputed_inputs():
    N, block, L = 1000, 100, 4
    common = {"activation_checkpointing": False}
    assert flops_per_token(N, block, L, runtime="reference", activations=None, **common) == 6 * N
    assert flops_per_token(N, block, L, runtime="reference", activations=None, activation_checkpointing=True) == 6 * N + 2 * L * block
    assert flops_per_token(N, block, L, runtime="fuyou", activations="none", **common) == 6 * N + 2 * block * (L + L * (L - 1) / 2)
    # runtime=fuyou's recompute skips each block's down projection; the rebuilt inputs run whole blocks
    assert flops_per_token(N, block, L, runtime="fuyou", activations="none", skipped_parameters=30, **common) == (
        6 * N + 2 * (block - 30) * L + 2 * block * L * (L - 1) / 2)
    assert flops_per_token(N, block, L, runtime="fuyou", activations="cpu", skipped_parameters=30, **common) == 6 * N + 2 * (block - 30) * L


def test_a_sweep_is_one_row_per_value_and_its_plots(tmp_path, capsys):
    out = profile(tmp_path, "runtime=fuyou", options=["--sweep", "train.batch_size=1,2"])
    with (out / "sweep.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["train.batch_size"] for row in rows] == ["1", "2"]
    assert [int(row["tokens"]) for row in rows] == [2 * 1 * SEQ, 2 * 2 * SEQ]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["swept"] == ["train.batch_size"] and len(sweep["rows"]) == 2
    for row, json_row in zip(rows, sweep["rows"]):
        assert float(row["tokens_per_s"]) == pytest.approx(json_row["tokens_per_s"])
        point = json.loads((out / row["directory"] / "profile.json").read_text())
        assert point["measurement"]["tokens_per_s"] == pytest.approx(json_row["tokens_per_s"])
    for name in ("sweep_tokens_per_s.png", "sweep_vram.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("train.batch_size") and len(table.splitlines()) == 4


BAD = {
    "unknown key": (["--sweep", "train.bogus=1,2"], "unknown key 'train.bogus'"),
    "bad value": (["--sweep", "train.batch_size=2,big"], "'train.batch_size' expects int"),
    "no values": (["--sweep", "train.batch_size"], "is not key=v1,v2"),
    "key twice": (["--sweep", "train.batch_size=1", "--sweep", "train.batch_size=2"], "given twice"),
    "no measured steps": (["--steps", "0"], "--steps >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    args, words = BAD[case]
    out = tmp_path / "out"
    code = main(["profile", "--config", TINY, *args, "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fuyou: error:") and words in err[0], err
    assert not out.exists()


def test_train_ends_with_the_profile_summary(tmp_path, capsys):
    code = main(["train", "--config", TINY, "train.steps=3", f"train.batch_size={BATCH}", f"train.seq_len={SEQ}",
                 "runtime=fuyou", "train.save_final=false", "--output", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    summary = capsys.readouterr().out
    assert re.search(r"^measured steps +2 \(", summary, re.MULTILINE), summary
    for line in ("hardware TFLOPS", "SSD read / write", "GPU energy", "loss"):
        assert line in summary, summary


class FakeNvml:
    """The pynvml calls NvmlPower makes, on a GPU that has drawn 1000 J between two counter reads."""

    NVMLError = RuntimeError

    def __init__(self):
        self.energy_mj = iter([5_000_000, 6_000_000])

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return next(self.energy_mj)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 300_000  # mW

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=3 << 30)


def test_gpu_energy_readers_without_a_gpu(monkeypatch):
    """The NVML and nvidia-smi readers' arithmetic, fed recorded answers (CI has no GPU)."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setattr(measure, "_cuda_uuid", lambda device: "GPU-fake")
    nvml = measure.NvmlPower(torch.device("cuda", 0))
    nvml.start()
    nvml.sample()
    energy = nvml.stop(0.0, 1.0)
    assert (energy.joules, energy.source, energy.peak_used_bytes) == (1000.0, "NVML energy counter", 3 << 30)

    samples = measure._PowerSamples()
    samples.times_s, samples.watts = [0.5, 1.0, 3.0], [100.0, 200.0, 200.0]
    assert samples.joules(0.0, 4.0) == 50.0 + 75.0 + 400.0 + 200.0  # trapezoids, the end samples held to the edges
    assert samples.joules(3.5, 4.0) is None

    smi = measure.SmiPower.__new__(measure.SmiPower)
    smi.samples, smi.peak_used_bytes, smi.first_sample = measure._PowerSamples(), 0, threading.Event()
    smi.process = SimpleNamespace(stdout=iter(["250.5, 1024\n", "[N/A], 10\n", "300.0, 2048\n"]))
    smi._read()
    assert smi.samples.watts == [250.5, 300.0] and smi.peak_used_bytes == 2048 << 20


def test_a_trace_draws_again_without_the_run(tmp_path):
    """A GPU machine without matplotlib keeps trace.json; `python -m fuyou.timeline` draws it elsewhere."""
    from fuyou.timeline import Span, Timeline, chrome_trace, from_chrome_trace

    spans = [Span("compute", "forward 0", 10.0, 10.5), Span("H2D", "h2d", 10.1, 10.2, 4096)]
    timeline = Timeline.of(spans, 10.0, 11.0, ("compute", "H2D"), "a step")
    again = from_chrome_trace(json.loads(json.dumps(chrome_trace(timeline))))
    assert again.lanes == timeline.lanes and again.title == "a step" and again.end_s - again.start_s == pytest.approx(1.0)
    for lane, figures in timeline.lane_summary().items():
        assert again.lane_summary()[lane] == pytest.approx(figures)
    out = tmp_path / "t.png"
    (tmp_path / "trace.json").write_text(json.dumps(chrome_trace(timeline)))
    subprocess.run([sys.executable, "-m", "fuyou.timeline", str(tmp_path / "trace.json"), str(out)], check=True)
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.gpu
def test_gpu_profile_times_compute_and_copies_on_the_device(tmp_path):
    """On the GPU machine: copies and compute from CUDA events, inside the step, and a power reading."""
    out = profile(tmp_path, "runtime=fuyou", "device=cuda", "train.precision=bf16", "offload.optimizer=ssd",
                  f"offload.ssd_dir={tmp_path}")
    report = json.loads((out / "profile.json").read_text())
    m, lanes = report["measurement"], report["timeline"]["lanes"]
    for lane in ("compute", "H2D", "D2H", "SSD read", "SSD write", "CPU optimizer"):
        assert lanes[lane]["spans"] > 0 and lanes[lane]["busy_fraction"] <= 1, lane
    assert m["h2d_bytes"] > 0 and m["d2h_bytes"] > 0 and m["peak_gpu_allocated_bytes"] > 0
    assert m["peak_gpu_reserved_bytes"] >= m["peak_gpu_allocated_bytes"]
    trace = json.loads((out / "trace.json").read_text())
    window_us = report["timeline"]["window_s"] * 1e6
    assert all(0 <= e["ts"] and e["ts"] + e["dur"] <= window_us * (1 + 1e-9) for e in trace["traceEvents"] if e["ph"] == "X")
    print(m["energy_j"], m["energy_source"], m["energy_reason"], m["peak_gpu_nvml_used_bytes"])
    assert m["energy_j"] is not None or "nvidia-ml-py" in m["energy_reason"] or "nvidia-smi" in m["energy_reason"]
