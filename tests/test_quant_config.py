"""quant.mode from the config: HALO on both runtimes, QLoRA on the reference runtime, saved outputs."""

import pytest

from fuyou.config import TrainConfig
from fuyou.errors import ConfigError
from fuyou.models import from_pretrained
from fuyou.trainer import Trainer

TINY = ["train.steps=3", "train.batch_size=2", "train.seq_len=64", "model.intermediate_size=384"]


@pytest.mark.parametrize("runtime", ["reference", "fuyou"])
def test_halo_from_the_config_swaps_block_linears_and_trains(runtime, tmp_path):
    from quant.halo import HaloLinear

    config = TrainConfig.from_yaml("configs/tiny.yaml", TINY + [f"runtime={runtime}", "quant.mode=halo", "quant.halo_level=2"])
    trainer = Trainer(config, output_dir=tmp_path / "run", progress=False)
    halo = [m for m in trainer.model.modules() if isinstance(m, HaloLinear)]
    assert len(halo) == 2 * 4  # qkv, o, gate_up, down in each of 2 blocks; the head stays plain
    assert all(m.level == 2 for m in halo)
    summary = trainer.train()
    assert summary.final_loss < summary.first_loss + 1.0
    assert from_pretrained(tmp_path / "run" / "final").num_parameters() == trainer.num_parameters


def test_qlora_from_the_config_trains_adapters_and_saves_them(tmp_path):
    pytest.importorskip("bitsandbytes")
    config = TrainConfig.from_yaml("configs/tiny.yaml", TINY + ["quant.mode=qlora", "quant.lora_rank=4", "quant.save_merged=true"])
    trainer = Trainer(config, output_dir=tmp_path / "run", progress=False)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    trainer.train()
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert from_pretrained(tmp_path / "run" / "final-merged").num_parameters() == trainer.num_parameters


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["quant.mode=qlora", "runtime=fuyou"], "quant.mode=qlora runs on runtime=reference"),
        (["quant.mode=fp4"], "quant.mode must be one of none, halo, qlora"),
        (["quant.halo_level=3"], "quant.halo_level must be 0, 1 or 2"),
        (["quant.optimizer_bits=16"], "quant.optimizer_bits must be 8 or 32"),
    ],
)
def test_bad_quant_settings_are_one_line_errors(overrides, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig.from_yaml("configs/tiny.yaml", overrides)
