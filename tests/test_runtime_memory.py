"""The runtime's smaller footprint (issue 4, a 10B model on 125 GB RAM + 64 GB disk), each path against the reference.

- the gradient ring (a few block-sized fp32 buffers instead of one accumulator per parameter) when a step
  is one micro-batch without clipping: every step's loss and the final weights as the reference's;
- building a model on "meta" block by block inside the runtime: the same weights as `build_model`, and
  no block is materialised while another one is;
- the swap file sized to what its allocator needs (no flat headroom), and the up-front memory check
  naming the short resource and the split of the optimizer state that fits.
SSD swap files live in tmp_path.
"""

import copy
import shutil
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from fuyou.cli import main
from fuyou.errors import ConfigError, FuyouError
from fuyou.models import Initializer, build_model, get_preset
from fuyou.reference import ReferenceTrainer
from fuyou.runtime import FuyouRuntime, Placement, check_fuyou_memory, memory_need
from offload import TieredStore
from offload.cpu_optimizer import GradientRing
from offload.errors import OffloadError
from offload.pinned import round_up
from offload.store import SSDTensor
from tests.test_runtime_parity import ODD_GPT, ODD_LLAMA, SCHEDULE, STEPS, step_data

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.yaml")


@pytest.mark.parametrize("preset, changes, optimizer_cpu_blocks, ring, params", [
    pytest.param("tiny-llama", ODD_LLAMA, 1, 1, "cpu", id="odd-llama-split1-ring1"),  # one buffer: backward waits for every update
    pytest.param("tiny-gpt3", ODD_GPT, None, 2, "cpu", id="odd-gpt-ssd-ring2"),
    pytest.param("tiny-llama", {}, 0, 3, "cpu", id="llama-split0-ring3"),
    # weights streamed from the masters, which every update rewrites in place while fetches read them
    pytest.param("tiny-llama", ODD_LLAMA, "in RAM", 1, "master", id="odd-llama-master-ring1"),
    # and the outer group updated on the compute device: the ring serves the blocks only
    pytest.param("tiny-gpt3", ODD_GPT, "in RAM, outer on the device", 2, "master", id="odd-gpt-master-outer-gpu-ring2"),
])
def test_gradient_ring_matches_the_reference_every_step(preset, changes, optimizer_cpu_blocks, ring, params, tmp_path):
    config = get_preset(preset).replace(**changes)
    model = build_model(config, seed=0)
    data = step_data(config.vocab_size, 1)
    reference_model, fuyou_model = copy.deepcopy(model), copy.deepcopy(model)
    reference = ReferenceTrainer(reference_model, max_grad_norm=None, **SCHEDULE)
    in_ram = isinstance(optimizer_cpu_blocks, str) and optimizer_cpu_blocks.startswith("in RAM")
    outer_optimizer = "gpu" if in_ram and optimizer_cpu_blocks.endswith("device") else "cpu"
    runtime = FuyouRuntime(fuyou_model, max_grad_norm=None, params=params, optimizer="cpu" if in_ram else "ssd", activations="cpu",
                           optimizer_cpu_blocks=None if in_ram else optimizer_cpu_blocks, ssd_dir=str(tmp_path), prefetch_depth=2,
                           gradient_ring=ring, outer_optimizer=outer_optimizer, **SCHEDULE)
    try:
        for batches in data:
            expected, got = reference.step(batches), runtime.step(batches)
            assert got.loss == pytest.approx(expected.loss, rel=1e-5)
            assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
        runtime.sync_model()
        optimizer = runtime.optimizer
        assert len(optimizer.ring.buffers) == ring
        assert all(part.grad is None for group in optimizer.groups.values() for part in group.parts), "every buffer given back"
    finally:
        runtime.close()
    assert set(runtime.update_modes) == {"speculated"}
    for (name, expected), got in zip(reference_model.named_parameters(), fuyou_model.parameters()):
        if name.endswith("qkv_proj.bias"):
            continue  # its exact gradient is zero: see test_fuyou_matches_the_reference_every_step
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_ring_refuses_clipping_and_accumulation(tmp_path):
    model = build_model(get_preset("tiny-llama"), seed=0)
    with pytest.raises(ConfigError, match="max_grad_norm=null"):
        FuyouRuntime(copy.deepcopy(model), max_grad_norm=1.0, gradient_ring=2, **SCHEDULE)
    runtime = FuyouRuntime(model, max_grad_norm=None, gradient_ring=2, **SCHEDULE)
    try:
        with pytest.raises(ConfigError, match="grad_accum=1"):
            runtime.step(step_data(model.config.vocab_size, 2, steps=1)[0])
    finally:
        runtime.close()


def test_gradient_ring_waits_for_a_queued_update_and_refuses_a_deadlock():
    with TieredStore() as store:
        ring = GradientRing(store, 1, [10, 3])
        a = ring.take("a", [10, 3])
        assert [t.numel() for t in a] == [10, 3]
        with pytest.raises(OffloadError, match="no update queued"):
            ring.take("b", [4, 1])  # a's update is not queued: waiting would never end
        ring.owe("a")
        giver = threading.Timer(0.2, ring.give_back, ("a",))
        giver.start()
        start_s = time.perf_counter()
        b = ring.take("b", [4, 1])  # waits for a's buffer
        assert time.perf_counter() - start_s >= 0.15 and [t.numel() for t in b] == [4, 1]
        assert b[0].data_ptr() == a[0].data_ptr()  # the same buffer, reused
        giver.join()


def test_trainer_uses_the_ring_only_without_accumulation_and_clipping(tmp_path):
    from fuyou.config import TrainConfig
    from fuyou.trainer import Trainer

    common = ["runtime=fuyou", "train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.save_final=false"]
    rings = {}
    for extra in (["train.max_grad_norm=null"], ["train.max_grad_norm=null", "train.grad_accum=2"], []):
        trainer = Trainer(TrainConfig.from_yaml(TINY, common + extra), progress=False)
        trainer.train()
        rings[" ".join(extra) or "clipping"] = trainer.runtime.gradient_ring
    assert rings == {"train.max_grad_norm=null": 4, "train.max_grad_norm=null train.grad_accum=2": 0, "clipping": 0}


def _record_materialised_blocks(runtime_model, monkeypatch) -> list[list[bool]]:
    """At each add_group: which blocks hold real (not meta) storage."""
    from offload.cpu_optimizer import OffloadedAdamW

    seen = []
    add_group = OffloadedAdamW.add_group

    def recording(self, key, *args, **kwargs):
        seen.append([not block.attn_norm.weight.is_meta for block in runtime_model.blocks])
        return add_group(self, key, *args, **kwargs)

    monkeypatch.setattr(OffloadedAdamW, "add_group", recording)
    return seen


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt3"])  # untied head (drawn after the blocks), tied
def test_building_block_by_block_gives_build_models_weights_and_one_block_at_a_time(preset, tmp_path, monkeypatch):
    config = get_preset(preset)
    built = build_model(config, seed=5)
    lazy = build_model(config, device="meta")
    seen = _record_materialised_blocks(lazy, monkeypatch)
    runtime = FuyouRuntime(lazy, max_grad_norm=None, optimizer="ssd", optimizer_cpu_blocks=1, ssd_dir=str(tmp_path),
                           initializer=Initializer(lazy, seed=5), **SCHEDULE)
    try:
        # add_group for block j: block j just built, every other block on meta (released or not yet built)
        assert seen[:-1] == [[i == j for i in range(config.num_layers)] for j in range(config.num_layers)]
        assert seen[-1] == [False] * config.num_layers  # the outer group, after every block was released
        runtime.sync_model()
    finally:
        runtime.close()
    for (name, expected), got in zip(built.named_parameters(), lazy.parameters()):
        assert torch.equal(got, expected), name


def test_a_built_model_releases_each_block_after_its_group(tmp_path, monkeypatch):
    model = build_model(get_preset("tiny-gpt3"), seed=0)
    seen = _record_materialised_blocks(model, monkeypatch)
    runtime = FuyouRuntime(model, max_grad_norm=None, **SCHEDULE)
    runtime.close()
    L = model.config.num_layers
    assert seen[:-1] == [[i >= j for i in range(L)] for j in range(L)]  # blocks before j already released


def test_lazy_and_built_runtimes_train_identically(tmp_path):
    config = get_preset("tiny-llama").replace(**ODD_LLAMA)
    data = step_data(config.vocab_size, 2, steps=4)
    lazy = build_model(config, device="meta")
    runs = [
        FuyouRuntime(build_model(config, seed=1), max_grad_norm=1.0, **SCHEDULE),
        FuyouRuntime(lazy, max_grad_norm=1.0, initializer=Initializer(lazy, seed=1), **SCHEDULE),
    ]
    try:
        for batches in data:
            built, lazily = (runtime.step(batches) for runtime in runs)
            assert built.loss == lazily.loss and built.grad_norm == lazily.grad_norm
    finally:
        for runtime in runs:
            runtime.close()


def test_the_swap_file_holds_the_homes_and_one_micro_batch_of_activations_no_more(tmp_path):
    # Three micro-batches of activations on SSD through 12 steps, every state on SSD: the allocator
    # reuses the activation extents, so the homes plus L + 1 activation extents are enough.
    config = get_preset("tiny-llama").replace(**ODD_LLAMA)
    model = build_model(config, seed=0)
    tokens = 2 * 24
    placement = Placement("ssd", "ssd", "ssd")
    need = memory_need(model, placement, block_dtype=torch.float32, activation_numel=tokens * config.hidden_size)
    runtime = FuyouRuntime(copy.deepcopy(model), max_grad_norm=1.0, params="ssd", optimizer="ssd", activations="ssd",
                           ssd_dir=str(tmp_path), micro_batch_tokens=tokens, **SCHEDULE)
    try:
        homes = [runtime.store.home(name) for name in runtime.store._homes]
        homes = sum(home.extent.capacity_bytes for home in homes if isinstance(home, SSDTensor))
        activation_bytes = round_up(4 * tokens * config.hidden_size)
        assert need.ssd_bytes == homes + (config.num_layers + 1) * activation_bytes
        assert runtime.store.swap.num_bytes == round_up(need.ssd_bytes)
        for batches in step_data(config.vocab_size, 3, steps=STEPS):
            runtime.step(batches)
        runtime.store.synchronize()
        assert runtime.store.ssd_budget.peak_bytes <= need.ssd_bytes
    finally:
        runtime.close()


def test_memory_need_counts_the_split_and_the_ring():
    config = get_preset("gpt3-13b").replace(num_layers=32)
    model = build_model(config, device="meta")
    N, P_b = config.num_parameters(), config.num_block_parameters()
    assert 10.2e9 < N < 10.4e9
    outer = N - 32 * P_b
    whole = memory_need(model, Placement("cpu", "cpu", "none"))
    split = memory_need(model, Placement("cpu", "ssd", "none", 18), gradient_ring=2)
    # 12 B state: 14 blocks move to the SSD; the gradients shrink from 4 B/param to 2 block-sized buffers
    # (a block is larger than the outer group here); 3 SSD blocks' states pass through RAM.
    assert P_b > outer
    assert split.ssd_bytes == pytest.approx(14 * 12 * P_b, rel=1e-4)
    saved = 14 * 12 * P_b + 4 * N - 2 * 4 * P_b - 3 * 12 * P_b
    assert whole.cpu_bytes - split.cpu_bytes == pytest.approx(saved, rel=1e-4)
    assert split.cpu_bytes < 112e9 and split.ssd_bytes < 55e9  # the GPU machine: 125 GB RAM, 64 GB disk
    # Streaming from the masters keeps no bf16 copy of the blocks: 2 B less per block matrix weight
    # (norms and biases, fp32 in both, are a rounding error here).
    from_masters = memory_need(model, Placement("master", "cpu", "none"))
    assert whole.cpu_bytes - from_masters.cpu_bytes == pytest.approx(2 * 32 * P_b, rel=1e-3)
    # The outer group updated on the device: neither its 12 B of state nor its 4 B of gradient in RAM.
    outer_on_device = memory_need(model, Placement("cpu", "cpu", "none", outer_optimizer="gpu"))
    assert whole.cpu_bytes - outer_on_device.cpu_bytes == pytest.approx(16 * outer, rel=1e-3)


Usage = namedtuple("Usage", "total used free")


def _machine(monkeypatch, *, ram_gb: float, disk_gb: float) -> None:
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("VM", (), {"available": int(ram_gb * 1e9)})())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(int(disk_gb * 1e9), 0, int(disk_gb * 1e9)))


def test_check_names_the_short_resource_and_the_split_that_fits(monkeypatch, tmp_path):
    model = build_model(get_preset("gpt3-13b").replace(num_layers=32), device="meta")
    args = {"block_dtype": torch.bfloat16, "gradient_ring": 4, "activation_numel": 8 * 2048 * 5120}
    _machine(monkeypatch, ram_gb=120, disk_gb=62)
    with pytest.raises(FuyouError) as everything_in_ram:
        check_fuyou_memory(model, Placement("cpu", "cpu", "cpu"), str(tmp_path), **args)
    message = str(everything_in_ram.value)
    assert "RAM short by" in message and "offload.optimizer=ssd offload.optimizer_cpu_blocks=" in message and "\n" not in message
    suggested = int(message.split("offload.optimizer_cpu_blocks=")[1].split()[0])
    assert check_fuyou_memory(model, Placement("cpu", "ssd", "cpu", suggested), str(tmp_path), **args).ssd_bytes < 62e9
    with pytest.raises(FuyouError, match="disk short by"):
        check_fuyou_memory(model, Placement("cpu", "ssd", "cpu", 0), str(tmp_path), **args)
    with pytest.raises(FuyouError, match="set offload.params=cpu offload.optimizer=ssd offload.optimizer_cpu_blocks="):
        check_fuyou_memory(model, Placement("master", "cpu", "cpu"), str(tmp_path), **args)  # its split needs weights of their own
    _machine(monkeypatch, ram_gb=60, disk_gb=40)
    with pytest.raises(FuyouError, match=r"no split of the optimizer state fits either: .* short by [\d.]+ GB of RAM"):
        check_fuyou_memory(model, Placement("cpu", "ssd", "cpu", 10), str(tmp_path), **args)


def test_a_10b_model_that_cannot_fit_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    _machine(monkeypatch, ram_gb=100, disk_gb=30)
    out = tmp_path / "out"
    code = main(["train", "--config", TINY, "model.preset=gpt3-13b", "model.num_layers=32", "runtime=fuyou", "offload.optimizer=ssd",
                 "offload.optimizer_cpu_blocks=16", f"offload.ssd_dir={tmp_path}", "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fuyou: error:") and "short by" in err[0], err
    assert not out.exists()


def test_split_keys_are_validated():
    with pytest.raises(ConfigError, match="set offload.optimizer=ssd"):
        Placement("cpu", "cpu", "cpu", 2)
    model = build_model(get_preset("tiny-llama"), seed=0)
    with pytest.raises(ConfigError, match="has 2 blocks"):
        FuyouRuntime(model, optimizer="ssd", optimizer_cpu_blocks=3, **SCHEDULE)
