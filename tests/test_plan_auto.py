"""plan: auto — the Trainer runs the planner's placement, micro-batch and prefetch depth."""

import pytest
import yaml

from fuyou.cli import main
from fuyou.config import TrainConfig
from fuyou.errors import ConfigError
from fuyou.trainer import Trainer

# A CPU machine described by hand (as `fuyou probe` would write it), so the test needs no probe.
CPU_PROFILE = """\
name: test-cpu
compute_device: cpu
gpu_tflops: 0.1
gpu_fp8_tflops: 0
gpu_memory_gb: 8
h2d_gbps: 10
d2h_gbps: 10
pcie_duplex_gbps: 10
cpu_memory_gb: 8
cpu_adam_gparams_per_s: 0.5
ssd_read_gbps: 1.0
ssd_write_gbps: 1.0
ssd_count: 1
ssd_capacity_gb: 10
source: written by hand for tests
"""


@pytest.fixture
def cpu_profile(tmp_path):
    path = tmp_path / "cpu.yaml"
    path.write_text(CPU_PROFILE)
    return str(path)


def test_plan_auto_trains_with_the_chosen_placement(cpu_profile, tmp_path):
    config = TrainConfig.from_yaml(
        "configs/tiny.yaml",
        ["runtime=fuyou", "plan=auto", f"hardware={cpu_profile}", "train.steps=3", "train.batch_size=4", "train.grad_accum=2",
         "train.save_final=false", f"offload.ssd_dir={tmp_path}"],
    )
    trainer = Trainer(config, output_dir=tmp_path / "run", progress=False)
    plan = trainer.plan_report.prediction.plan
    offload = trainer.config.offload
    assert (offload.params, offload.optimizer, offload.activations) == (plan.params, plan.optimizer, plan.activations)
    # The planner may split the step differently, but the step's batch stays what the config asked.
    assert trainer.config.train.batch_size * trainer.config.train.grad_accum == 8
    summary = trainer.train()
    assert summary.steps == 3
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["offload"]["params"] == plan.params  # the resolved config records what ran


def test_plan_auto_needs_the_fuyou_runtime():
    with pytest.raises(ConfigError, match="plan=auto places states for runtime=fuyou"):
        TrainConfig.from_yaml("configs/tiny.yaml", ["plan=auto"])


def test_plan_auto_refuses_a_profile_of_another_kind_of_machine(capsys, tmp_path):
    code = main(["train", "--config", "configs/tiny.yaml", "runtime=fuyou", "plan=auto", "device=cpu",
                 "hardware=configs/hardware/rtx4090-12ssd.yaml", "--output", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "describes a cuda machine but this run computes on cpu" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
