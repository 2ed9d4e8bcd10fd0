"""`fuyou train` end to end on the CPU, and every bad input as one line with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuyou.cli import main
from fuyou.models import from_pretrained

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
REQUIRED_METRICS = {"step", "loss", "lr", "tokens", "tokens_per_s", "model_tflops", "peak_gpu_bytes", "peak_cpu_bytes"}


def test_train_tiny_writes_metrics_and_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", TINY, "train.steps=40", "--output", str(out), "--no-progress"])
    assert code == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41))
    assert REQUIRED_METRICS <= set(lines[0])
    assert lines[-1]["tokens"] == 40 * 8 * 128
    assert all(m["tokens_per_s"] > 0 and m["model_tflops"] > 0 and m["peak_cpu_bytes"] > 0 for m in lines)
    assert sum(m["loss"] for m in lines[-5:]) < 0.7 * sum(m["loss"] for m in lines[:5])
    summary = capsys.readouterr().out
    assert "tokens/s" in summary and "model TFLOPS" in summary

    final = out / "final"
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))
    assert not (out / ".final.partial").exists()
    ours = from_pretrained(final)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_output_dir_is_never_clobbered_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["train", "--config", TINY, "train.steps=2", "train.save_final=false", "--output", str(out), "--no-progress"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "missing config": (lambda t: ["--config", str(t / "nope.yaml")], "not found"),
    "malformed yaml": (lambda t: ["--config", _write(t, "bad.yaml", "train: [1,\n")], "malformed YAML"),
    "unknown key": (lambda t: ["--config", TINY, "train.stepz=3"], "unknown key 'train.stepz'"),
    "wrong type": (lambda t: ["--config", TINY, "train.batch_size=big"], "'train.batch_size' expects int"),
    "missing dataset": (lambda t: ["--config", TINY, f"data.source={t / 'absent.jsonl'}"], "absent.jsonl"),
    "bad jsonl line": (
        lambda t: ["--config", TINY, "data.source=" + _write(t, "d.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')],
        "d.jsonl:3",
    ),
    "vocab mismatch": (lambda t: ["--config", TINY, "model.vocab_size=100"], "vocab"),
    "unknown preset": (lambda t: ["--config", TINY, "model.preset=gpt5"], "gpt5"),
    "missing model dir": (lambda t: ["--config", TINY, f"model.path={t / 'nomodel'}"], "nomodel"),
    "seq_len too long": (lambda t: ["--config", TINY, "train.seq_len=100000"], "max_seq_len"),
    "no gpu": (lambda t: ["--config", TINY, "device=cuda"], "no CUDA GPU"),
    "does not fit": (lambda t: ["--config", TINY, "model.preset=gpt3-175b"], "set runtime=fuyou"),
    # 175B in fp32 before quantization (700 GB): the fix named is QLoRA's streamed build
    "qlora does not fit": (lambda t: ["--config", TINY, "model.preset=gpt3-175b", "quant.mode=qlora"], "quant.stream=true"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    if case == "no gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    make_args, words = BAD_INPUTS[case]
    out = tmp_path / "out"
    code = main(["train", *make_args(tmp_path), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("fuyou: error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_the_console_entry_point_and_a_light_import():
    help_text = subprocess.run(
        [sys.executable, "-m", "fuyou", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--config" in help_text and "metrics.jsonl" in help_text
    probe = "import sys, fuyou; bad = [m for m in ('deepspeed', 'kvikio', 'transformers', 'torch') if m in sys.modules]; print(bad)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
