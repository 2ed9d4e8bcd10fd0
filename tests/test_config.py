"""Config: YAML + overrides into typed dataclasses; every mistake is a one-line ConfigError naming the key."""

from pathlib import Path

import pytest

from fuyou.config import TrainConfig
from fuyou.errors import ConfigError
from fuyou.lr_schedule import lr_at_step


CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_command(path):
    config = TrainConfig.from_yaml(path)
    first_line = path.read_text().splitlines()[0]
    assert first_line == f"# fuyou train --config configs/{path.name}" or first_line.startswith(
        f"# fuyou train --config configs/{path.name} "
    )
    assert "Hardware:" in path.read_text()
    from fuyou.models import get_preset

    get_preset(config.model.preset)  # the preset exists


def test_defaults_without_a_file():
    config = TrainConfig.from_yaml(None)
    assert config.runtime == "reference" and config.train.steps >= 1


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  lr: 1.0e-3\nmodel:\n  preset: tiny-gpt3\n")
    config = TrainConfig.from_yaml(
        path, ["train.lr=1e-4", "train.max_grad_norm=null", "model.num_layers=3", "data.pack=false", "seed=5"]
    )
    assert config.train.steps == 7
    assert config.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads "1e-4" as text; float fields accept it
    assert config.train.max_grad_norm is None
    assert config.model.num_layers == 3 and config.data.pack is False and config.seed == 5
    assert isinstance(TrainConfig.from_yaml(None, ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.stpes=3", ["unknown key 'train.stpes'", "did you mean 'train.steps'"]),
        ("trian.steps=3", ["unknown section 'trian'"]),
        ("train.steps=three", ["'train.steps' expects int", "three"]),
        ("train.steps=2.5", ["'train.steps' expects int"]),
        ("train.steps=null", ["'train.steps' cannot be null"]),
        ("train.activation_checkpointing=3", ["expects bool"]),
        ("train=3", ["'train' is a section"]),
        ("train.steps", ["not key=value"]),
        ("train.steps=0", ["train.steps must be >= 1"]),
        ("runtime=deepspeed", ["runtime must be one of"]),
        ("offload.params=nvme", ["offload.params must be one of gpu, cpu, ssd, master"]),
        ("offload.outer_optimizer=ssd", ["offload.outer_optimizer must be one of cpu, gpu"]),
        ("train.precision=fp8", ["train.precision must be one of"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_yaml(None, [override])
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: malformed YAML"):
        TrainConfig.from_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        TrainConfig.from_yaml(scalar)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  bach_size: 4\n")
    with pytest.raises(ConfigError, match=r"unknown\.yaml: unknown key 'train.bach_size'; did you mean 'train.batch_size'"):
        TrainConfig.from_yaml(unknown)


def test_shape_overrides_conflict_with_a_model_path():
    with pytest.raises(ConfigError, match="model.num_layers cannot change a model loaded from model.path"):
        TrainConfig.from_yaml(None, ["model.path=/somewhere", "model.num_layers=2"])


def test_lr_schedule_warmup_then_cosine_to_floor():
    kwargs = dict(peak_lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_at_step(s, **kwargs) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at_step(4, **kwargs) == pytest.approx(1.0)
    assert lr_at_step(9, **kwargs) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at_step(14, **kwargs) == pytest.approx(0.1)
    assert lr_at_step(100, **kwargs) == pytest.approx(0.1)
    assert lr_at_step(0, peak_lr=2.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == pytest.approx(2.0)


def test_activations_none_is_a_choice_not_null():
    # "none" reads as null for optional keys, but for offload.activations it is the recompute placement.
    assert TrainConfig.from_yaml(None, ["offload.activations=none"]).offload.activations == "none"
    assert TrainConfig.from_yaml(None, ["offload.activations=null"]).offload.activations is None
    assert TrainConfig.from_yaml(None, ["train.max_grad_norm=none"]).train.max_grad_norm is None
