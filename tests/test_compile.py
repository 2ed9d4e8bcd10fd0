"""train.compile: one compiled function runs every block, in both runtimes, and the losses stay the reference's.

CPU tests compile with the "aot_eager" backend (dynamo and AOTAutograd without a C++ compiler): the
tracing, the one-graph-for-all-blocks trick, the compiled backward and the error path are the same as
with Inductor; only the kernels differ. fp32 on the CPU, so the losses match the eager runs to 1e-5.
The GPU tests (marked `gpu`) run Inductor in bf16 against the eager reference at the 1e-3 of the other
bf16 GPU parity tests.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from batches import fixed_batches
from fuyou import block_compile
from fuyou.config import TrainConfig
from fuyou.errors import ConfigError, FuyouError
from fuyou.models import build_model, get_preset
from fuyou.reference import ReferenceTrainer
from fuyou.runtime import FuyouRuntime
from fuyou.trainer import Trainer

SCHEDULE = dict(lr=3e-3, warmup_steps=1, total_steps=4, weight_decay=0.1, max_grad_norm=1.0)
SMALL_GPT = dict(num_layers=3, hidden_size=64, num_heads=4, vocab_size=300)
SMALL_LLAMA = dict(num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=160, vocab_size=300)


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(block_compile, "BACKEND", "aot_eager")
    torch._dynamo.reset()  # graph counts per test: no graph compiled by an earlier test reused
    counters.clear()


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_config_rejects_compile_on_the_cpu():
    with pytest.raises(ConfigError, match="train.compile needs device=cuda"):
        TrainConfig.from_yaml(None, ["train.compile=true", "device=cpu"])
    assert TrainConfig.from_yaml(None, ["train.compile=true", "device=cuda", "quant.mode=qlora", "quant.stream=true"]).train.compile
    assert TrainConfig.from_yaml(None, ["train.compile=true", "device=cuda"]).train.compile


@pytest.mark.skipif(torch.cuda.is_available(), reason="device=auto resolves to the GPU here")
def test_trainer_rejects_compile_when_auto_finds_no_gpu():
    with pytest.raises(ConfigError, match="train.compile needs device=cuda"):
        Trainer(TrainConfig.from_yaml(None, ["train.compile=true", "device=auto"]), progress=False)


@pytest.mark.parametrize("preset, changes, activations", [
    pytest.param("tiny-llama", SMALL_LLAMA, "cpu", id="llama-activations-cpu"),
    pytest.param("tiny-gpt3", SMALL_GPT, "none", id="gpt-recompute-from-x0"),
])
def test_compiled_runtime_matches_the_eager_reference_with_one_graph_per_grad_mode(preset, changes, activations, aot_eager):
    config = get_preset(preset).replace(**changes)
    model = build_model(config, seed=0)
    data = fixed_batches(5, 4, config.vocab_size, batch_size=2, seq_len=16)
    reference = ReferenceTrainer(copy.deepcopy(model), **SCHEDULE)
    runtime = FuyouRuntime(copy.deepcopy(model), activations=activations, micro_batch_tokens=2 * 16, compile_blocks=True, **SCHEDULE)
    try:
        for batch in data:
            expected, got = reference.step([batch]), runtime.step([batch])
            assert got.loss == pytest.approx(expected.loss, rel=1e-5)
            assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
    finally:
        runtime.close()
    # Three blocks, one function: a graph without grad (forward, recompute) and one with it (backward).
    assert unique_graphs() == 2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_compiled_reference_matches_the_eager_one(checkpointing, aot_eager):
    config = get_preset("tiny-gpt3").replace(**SMALL_GPT)
    model = build_model(config, seed=0)
    data = fixed_batches(6, 3, config.vocab_size, batch_size=2, seq_len=16)
    eager = ReferenceTrainer(copy.deepcopy(model), activation_checkpointing=checkpointing, **SCHEDULE)
    compiled = ReferenceTrainer(copy.deepcopy(model), activation_checkpointing=checkpointing, compile_blocks=True, **SCHEDULE)
    for batch in data:
        assert compiled.step([batch]).loss == pytest.approx(eager.step([batch]).loss, rel=1e-5)
    assert unique_graphs() == 2  # every block and step reuses the first block's graph; the head and loss are the other


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # the Hadamard blocks' cache
def test_compiled_halo_block_matches_eager_halo(aot_eager):
    # HALO's autograd.Function traces whole (fullgraph); on the CPU its FP8 GEMMs are simulated.
    from quant.halo import apply_halo

    config = get_preset("tiny-llama").replace(**SMALL_LLAMA)
    model = build_model(config, seed=0)
    apply_halo(model, level=1)
    data = fixed_batches(8, 2, config.vocab_size, batch_size=2, seq_len=16)
    eager = ReferenceTrainer(copy.deepcopy(model), **SCHEDULE)
    compiled = ReferenceTrainer(copy.deepcopy(model), compile_blocks=True, **SCHEDULE)
    for batch in data:
        assert compiled.step([batch]).loss == pytest.approx(eager.step([batch]).loss, rel=1e-5)


# NF4 on the CPU wants block linears' in_features in multiples of 64 (quant.qlora.cpu_dequantize_garbles_ragged_rows).
QLORA_LLAMA = get_preset("tiny-llama").replace(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2,
                                               intermediate_size=256, vocab_size=300)
DROPOUT = 0.2


def streamed_qlora(config, *, compile_blocks, cache_bytes):
    """A streamed QLoRA runtime as `fuyou train quant.stream=true` builds it (fuyou.Trainer._streamed_qlora)."""
    from offload import TieredStore
    from quant.qlora import make_paged_adamw
    from quant.qlora_stream import StreamedQLoRA, build_streamed_qlora

    store = TieredStore(cpu_cap_bytes=None, gpu_cap_bytes=None, device=None)
    torch.manual_seed(0)  # peft's LoRA init draws from the global RNG
    model, payloads = build_streamed_qlora(build_model(config, seed=0), store=store, device=torch.device("cpu"),
                                           rank=4, dropout=DROPOUT)
    optimizer = make_paged_adamw(model, lr=3e-3, weight_decay=0.1, optim_bits=32)
    return StreamedQLoRA(model, payloads, store, device=torch.device("cpu"), optimizer=optimizer, lr=3e-3, warmup_steps=1,
                         total_steps=4, max_grad_norm=1.0, cache_bytes=cache_bytes, compile_blocks=compile_blocks)


def test_compiled_streamed_qlora_matches_the_eager_one_with_dropout_and_kept_outputs(aot_eager):
    # bitsandbytes' 4-bit matmul and peft's LoRA layers trace whole (fullgraph); the kept outputs and the
    # skipped down projection reach the compiled recompute; dropout masks come back from the restored RNG.
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    config = QLORA_LLAMA
    tokens = 2 * 16
    # Room for qkv_proj's output [T, (H + 2K) E] of every block and o_proj's of the first: blocks differ.
    cache_bytes = 4 * tokens * 256 * 4 + tokens * 128 * 4
    eager = streamed_qlora(config, compile_blocks=False, cache_bytes=cache_bytes)
    compiled = streamed_qlora(config, compile_blocks=True, cache_bytes=cache_bytes)
    try:
        data = fixed_batches(10, 4, config.vocab_size, batch_size=2, seq_len=16)
        for step, batch in enumerate(data):
            torch.manual_seed(step)  # both draw the same dropout masks (aot_eager's RNG is eager's)
            expected = eager.step([batch])
            torch.manual_seed(step)
            got = compiled.step([batch])
            assert got.loss == pytest.approx(expected.loss, rel=1e-5)
            assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
        assert compiled.cache.plan.chosen == eager.cache.plan.chosen
        assert {name for _, name in compiled.cache.plan.chosen} == {"attn.qkv_proj.base_layer", "attn.o_proj.base_layer"}
        assert compiled.cache.peak_bytes == eager.cache.peak_bytes == cache_bytes
    finally:
        eager.close()
        compiled.close()
    # Per grad mode, one graph for each set of kept outputs (block 0 keeps two, the others one) and for block
    # 0's input that needs no gradient; never one per block.
    assert unique_graphs() == 4


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_compiled_qlora_matches_the_eager_one(checkpointing, aot_eager):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from quant.qlora import make_paged_adamw, prepare_qlora

    def trainer(compile_blocks):
        torch.manual_seed(0)
        model = prepare_qlora(build_model(QLORA_LLAMA, seed=0), rank=4, dropout=DROPOUT)
        optimizer = make_paged_adamw(model, lr=3e-3, weight_decay=0.1, optim_bits=32)
        return ReferenceTrainer(model, optimizer=optimizer, activation_checkpointing=checkpointing,
                                compile_blocks=compile_blocks, **SCHEDULE)

    eager, compiled = trainer(False), trainer(True)
    for step, batch in enumerate(fixed_batches(10, 3, QLORA_LLAMA.vocab_size, batch_size=2, seq_len=16)):
        torch.manual_seed(step)
        expected = eager.step([batch])
        torch.manual_seed(step)
        got = compiled.step([batch])
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
    assert unique_graphs() == 3  # block 0 (its input needs no gradient), the rest, and the head with the loss


def test_a_compiler_failure_names_the_setting_that_avoids_it(monkeypatch):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no kernels today")

    monkeypatch.setattr(block_compile, "BACKEND", broken_backend)
    config = get_preset("tiny-gpt3").replace(**SMALL_GPT)
    trainer = ReferenceTrainer(build_model(config, seed=0), compile_blocks=True, **SCHEDULE)
    with pytest.raises(FuyouError, match="set train.compile=false"):
        trainer.step(fixed_batches(9, 1, config.vocab_size, batch_size=2, seq_len=16))


# ---- GPU: Inductor, bf16 ---------------------------------------------------------------------------

GPU_STEPS = 8


def gpu_losses(trainer, data):
    return [trainer.step([batch]).loss for batch in data]


@pytest.mark.gpu
@pytest.mark.parametrize("preset, placement", [
    pytest.param("tiny-llama", ("cpu", "cpu", "cpu"), id="llama-cpu-cpu-cpu"),
    pytest.param("tiny-gpt3", ("gpu", "cpu", "none"), id="gpt-gpu-cpu-none"),
])
def test_gpu_compiled_runtime_tracks_the_eager_reference(preset, placement):
    config = get_preset(preset)
    model = build_model(config, seed=0)
    data = fixed_batches(3, GPU_STEPS, config.vocab_size, batch_size=4, seq_len=64)
    schedule = dict(SCHEDULE, total_steps=GPU_STEPS, precision="bf16")
    expected = gpu_losses(ReferenceTrainer(copy.deepcopy(model).cuda(), **schedule), data)
    params, optimizer, activations = placement
    runtime = FuyouRuntime(copy.deepcopy(model), device="cuda", params=params, optimizer=optimizer, activations=activations,
                           gpu_memory_gb=24, micro_batch_tokens=4 * 64, compile_blocks=True, **schedule)
    try:
        got = gpu_losses(runtime, data)
    finally:
        runtime.close()
    worst = max(abs(g - e) / e for g, e in zip(got, expected))
    print(f"compiled runtime {preset} {placement}: worst relative loss difference {worst:.2e} over {GPU_STEPS} steps")
    assert got == pytest.approx(expected, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_gpu_compiled_reference_tracks_the_eager_one(checkpointing):
    config = get_preset("tiny-llama")
    model = build_model(config, seed=0)
    data = fixed_batches(4, GPU_STEPS, config.vocab_size, batch_size=4, seq_len=64)
    schedule = dict(SCHEDULE, total_steps=GPU_STEPS, precision="bf16", activation_checkpointing=checkpointing)
    expected = gpu_losses(ReferenceTrainer(copy.deepcopy(model).cuda(), **schedule), data)
    got = gpu_losses(ReferenceTrainer(copy.deepcopy(model).cuda(), compile_blocks=True, **schedule), data)
    worst = max(abs(g - e) / e for g, e in zip(got, expected))
    print(f"compiled reference, checkpointing={checkpointing}: worst relative loss difference {worst:.2e}")
    assert got == pytest.approx(expected, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("runtime_name", ["reference", "fuyou"])
def test_gpu_compiled_halo_tracks_eager_halo(runtime_name):
    # FP8 on the H100 (torch._scaled_mm); the quantizer is traced into the block's graph. Compiled and eager
    # quantize the same values (fp32 scaling in both), so the losses agree far inside FP8's own error.
    from quant.halo import apply_halo

    config = get_preset("tiny-gpt3")
    model = build_model(config, seed=0)
    apply_halo(model, level=0)
    data = fixed_batches(5, GPU_STEPS, config.vocab_size, batch_size=4, seq_len=64)
    schedule = dict(SCHEDULE, total_steps=GPU_STEPS, precision="bf16")
    expected = gpu_losses(ReferenceTrainer(copy.deepcopy(model).cuda(), **schedule), data)
    if runtime_name == "reference":
        got = gpu_losses(ReferenceTrainer(copy.deepcopy(model).cuda(), compile_blocks=True, **schedule), data)
    else:
        runtime = FuyouRuntime(copy.deepcopy(model), device="cuda", gpu_memory_gb=24, micro_batch_tokens=4 * 64,
                               compile_blocks=True, **schedule)
        try:
            got = gpu_losses(runtime, data)
        finally:
            runtime.close()
    worst = max(abs(g - e) / e for g, e in zip(got, expected))
    print(f"compiled HALO level 0, runtime={runtime_name}: worst relative loss difference {worst:.2e}")
    assert got == pytest.approx(expected, rel=1e-2)
