"""Streamed QLoRA (quant.stream): every step equals unstreamed QLoRA, the NF4 blocks really move through the
tiered store, the store's caps hold, and the adapters still export in PEFT format.

On the CPU the streamed path computes in fp32 like the unstreamed one (its frozen embedding/head dtype is
the compute dtype), quantizes the same weights (drawn piece by piece from the same seed) and restores the
LoRA dropout RNG for each recomputed block, so the two agree to float32 summation order: the head's
token chunks and the checkpointed recompute are the only differences, well inside 1e-6 relative.
Shapes keep every block linear's in_features a multiple of 64 (see quant.qlora.cpu_dequantize_garbles_ragged_rows).
"""

import gc
import json

import pytest
import torch

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file

from fuyou.config import TrainConfig
from fuyou.errors import ConfigError
from fuyou.models import from_pretrained
from fuyou.trainer import Trainer
from offload import OffloadError
from quant.qlora_stream import payload_name

LOSS_RTOL = 1e-6
TINY = ["train.batch_size=2", "train.seq_len=64", "train.lr=1e-2", "train.warmup_steps=1", "train.max_grad_norm=0.5",
        "quant.mode=qlora", "quant.lora_rank=4", "train.save_final=false"]
SHAPES = {"llama": ["model.intermediate_size=384"], "gpt2": ["model.preset=tiny-gpt3"]}


def make_trainer(overrides, stream, output_dir=None):
    config = TrainConfig.from_yaml("configs/tiny.yaml", TINY + overrides + [f"quant.stream={str(stream).lower()}"])
    return Trainer(config, output_dir=output_dir, progress=False)


def run_steps(trainer, steps):
    try:
        return [trainer.step().loss for _ in range(steps)]
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "shape, extra",
    [
        ("llama", ["quant.lora_dropout=0.1", "offload.prefetch_depth=1"]),
        ("llama", ["quant.lora_dropout=0.0", "offload.prefetch_depth=0", "train.grad_accum=2"]),
        ("gpt2", ["quant.lora_dropout=0.1", "offload.prefetch_depth=2", "train.grad_accum=2", "quant.optimizer_bits=8"]),
    ],
)
def test_streamed_qlora_matches_unstreamed_every_step(shape, extra):
    overrides = SHAPES[shape] + extra
    expected = run_steps(make_trainer(overrides, stream=False), 3)
    streamed = run_steps(make_trainer(overrides, stream=True), 3)
    assert expected[-1] < expected[0]  # it trains
    for step, (ours, reference) in enumerate(zip(streamed, expected, strict=True)):
        assert abs(ours - reference) <= LOSS_RTOL * abs(reference), (step, streamed, expected)


def test_blocks_live_in_the_store_and_stream_twice_per_micro_batch():
    trainer = make_trainer(SHAPES["llama"] + ["train.grad_accum=2"], stream=True)
    try:
        runtime, base = trainer.runtime, trainer.model.get_base_model()
        for block in base.blocks:  # between steps no block holds its NF4 tensors
            for name, parameter in block.named_parameters():
                if "base_layer.weight" in name:
                    assert parameter.numel() == 0 and parameter.quant_state is None, name
        assert base.lm_head.weight.dtype == torch.float32  # the compute dtype on the CPU (bf16 on a GPU)
        homes = [runtime.store.home(payload_name(j)) for j in range(len(base.blocks))]
        assert all(home.dtype == torch.uint8 and home.device.type == "cpu" for home in homes)
        assert runtime.nf4_bytes == sum(home.numel() for home in homes)
        # One block's NF4: 4 bits per weight, an 8-bit absmax per 64 weights, and per linear the code books
        # (16 + 256 floats), the second-level absmax and offset, and alignment: under 2 KiB.
        modules = runtime.payloads[0].modules
        weights = sum(module.in_features * module.out_features for module in modules)
        assert weights // 2 + weights // 64 < runtime.payloads[0].num_bytes < weights // 2 + weights // 64 + len(modules) * 2048

        before = dict(runtime.store.moved_bytes)
        trainer.step()
        moved = runtime.store.moved_bytes["h2h"] - before.get("h2h", 0)  # h2d on a GPU
        # Each of 2 micro-batches fetches every block for the forward and again for the backward.
        assert moved == 2 * 2 * runtime.nf4_bytes
    finally:
        trainer.close()


def test_the_pinned_cap_holds_homes_and_prefetched_blocks():
    probe = make_trainer(SHAPES["llama"], stream=True)
    block_bytes = probe.runtime.payloads[0].num_bytes
    capacity = -(-block_bytes // 4096) * 4096  # the pool's buffers are whole 4096-byte pages
    num_blocks = len(probe.runtime.payloads)
    probe.close()
    depth = 1
    # Homes, plus the block computing and the `depth` blocks fetched ahead of it.
    enough_gb = (num_blocks + depth + 1) * capacity / 2**30
    trainer = make_trainer(SHAPES["llama"] + [f"offload.cpu_memory_gb={enough_gb}", f"offload.prefetch_depth={depth}"],
                           stream=True)
    run_steps(trainer, 2)
    pool = trainer.runtime.store.report()["cpu_pinned"]
    assert pool["peak_bytes"] <= pool["cap_bytes"] == int(enough_gb * 2**30)

    short_gb = (num_blocks + depth) * capacity / 2**30  # one block fewer than the schedule keeps in flight
    trainer = make_trainer(SHAPES["llama"] + [f"offload.cpu_memory_gb={short_gb}", f"offload.prefetch_depth={depth}"],
                           stream=True)
    with pytest.raises(OffloadError, match="pinned CPU budget exceeded"):
        run_steps(trainer, 1)


def test_streamed_adapters_export_in_peft_format_and_match_unstreamed(tmp_path):
    outputs = {}
    for stream in (False, True):
        overrides = SHAPES["llama"] + ["train.save_final=true", "quant.save_merged=true", "train.steps=2"]
        trainer = make_trainer(overrides, stream=stream, output_dir=tmp_path / str(stream))
        trainer.train()
        outputs[stream] = tmp_path / str(stream)
    streamed, unstreamed = (load_file(outputs[s] / "final" / "adapter_model.safetensors") for s in (True, False))
    assert streamed.keys() == unstreamed.keys()
    for name in streamed:
        torch.testing.assert_close(streamed[name], unstreamed[name], rtol=1e-5, atol=1e-7)
    config = json.loads((outputs[True] / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    # The merged export fetched each streamed block back for dequantizing: the same model as unstreamed.
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = from_pretrained(outputs[True] / "final-merged")(input_ids)
        torch.testing.assert_close(merged, from_pretrained(outputs[False] / "final-merged")(input_ids), rtol=1e-4, atol=1e-5)
        hf = transformers.AutoModelForCausalLM.from_pretrained(outputs[True] / "final-merged", dtype=torch.float32)
        with_adapters = peft.PeftModel.from_pretrained(hf, outputs[True] / "final")  # loads: names and shapes fit
    assert len([m for m in with_adapters.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]) == 2 * 7


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["quant.stream=true"], "quant.stream streams QLoRA's 4-bit blocks; set quant.mode=qlora"),
        (["quant.mode=qlora", "quant.stream=true", "runtime=fuyou"], "quant.mode=qlora runs on runtime=reference"),
    ],
)
def test_stream_settings_are_checked(overrides, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig.from_yaml("configs/tiny.yaml", overrides)


GPU_TINY = ["device=cuda", "train.precision=bf16", "model.hidden_size=256", "model.intermediate_size=768",
            "model.num_layers=4", "model.num_heads=4", "train.grad_accum=2", "train.lr=1e-3"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_qlora_on_a_gpu_under_its_cap():
    """bf16 on CUDA: the streamed model keeps its embedding, head, norms and residual stream in bf16 (fp32
    unstreamed), so losses agree to bf16 rounding. At lr 1e-2 three steps amplified that rounding to 3.6%
    (measured); at 1e-3 the steps still train and stay comparable."""
    gpu = GPU_TINY
    expected = run_steps(make_trainer(SHAPES["llama"] + gpu, stream=False), 3)
    gc.collect()
    torch.cuda.empty_cache()  # the unstreamed model's memory, so the cap below counts only the streamed run
    trainer = make_trainer(SHAPES["llama"] + gpu + ["offload.gpu_memory_gb=2", "offload.prefetch_depth=2"], stream=True)
    runtime = trainer.runtime
    try:
        moved_before = runtime.store.moved_bytes["h2d"]  # the build moves nothing to the GPU
        torch.cuda.reset_peak_memory_stats()
        streamed = [trainer.step().loss for _ in range(3)]
        torch.testing.assert_close(torch.tensor(streamed), torch.tensor(expected), rtol=2e-2, atol=0)
        assert runtime.store.moved_bytes["h2d"] - moved_before == 3 * 2 * 2 * runtime.nf4_bytes
        # At most the block backpropagating, the one recomputed ahead of it and the 2 fetched ahead are on the GPU.
        assert runtime.store.report()["gpu_store"]["peak_bytes"] <= 4 * -(-runtime.payloads[0].num_bytes // 4096) * 4096
        assert torch.cuda.max_memory_reserved() <= 2 * 2**30
    finally:
        trainer.close()
        torch.cuda.set_per_process_memory_fraction(1.0)  # the store's cap outlives it in this process


def count_nf4_matmuls(monkeypatch):
    """Counts bitsandbytes' 4-bit matmuls (Linear4bit.forward looks `bnb.matmul_4bit` up at each call)."""
    import bitsandbytes as bnb

    calls = []
    original = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


# both blocks' qkv_proj outputs: 2 blocks x T tokens x (H + 2K) E x fp32 (tiny-llama: H 4, K 2, E 32)
QKV_OUTPUTS_BYTES = 2 * (2 * 64) * 256 * 4


@pytest.mark.parametrize("cache_gb", [1.1 * QKV_OUTPUTS_BYTES / 2**30, 1.0])
def test_kept_outputs_skip_recompute_gemms_and_change_nothing(monkeypatch, cache_gb):
    """quant.stream_cache_gb: the recompute takes kept outputs instead of running their GEMMs; the losses and the
    trained adapters are those of the plain streamed run (same GEMM, same input: the same values)."""
    overrides = SHAPES["llama"] + ["quant.lora_dropout=0.1", "train.grad_accum=2"]
    plain_trainer = make_trainer(overrides, stream=True)
    calls = count_nf4_matmuls(monkeypatch)
    plain = run_steps(plain_trainer, 3)
    plain_calls, calls[:] = len(calls), []
    # Per micro-batch every block linear runs in the forward and all but down_proj in the recompute (its
    # output is never read); the input gradients dequantize without a 4-bit matmul.
    num_blocks, num_linears = len(plain_trainer.runtime.payloads), len(plain_trainer.runtime.cache.linears[0])
    assert plain_calls == 3 * 2 * num_blocks * (2 * num_linears - 1)
    assert plain_trainer.runtime.cache.plan.skipped_flops > 0
    cached_trainer = make_trainer(overrides + [f"quant.stream_cache_gb={cache_gb}"], stream=True)
    cache = cached_trainer.runtime.cache
    try:
        cached = [cached_trainer.step().loss for _ in range(3)]
        plan = cache.plan
        blocks = cached_trainer.model.get_base_model().blocks
        adapters = {name: p.detach().clone() for name, p in cached_trainer.model.named_parameters() if p.requires_grad}
    finally:
        cached_trainer.close()
    micro_batches = 3 * 2
    assert plan.chosen and plan.num_bytes <= cache_gb * 2**30
    assert len(calls) == plain_calls - micro_batches * len(plan.chosen)  # one GEMM fewer per kept output
    if cache_gb >= 1.0:  # room for every block linear of every block but down_proj, which needs no keeping
        assert len(plan.chosen) == len(blocks) * (len(cache.linears[0]) - 1)
        assert not any(name.startswith("mlp.down_proj") for _, name in plan.chosen)
    else:  # equal recompute FLOPs per byte kept (in_features = D for all three): module order, qkv_proj first
        assert plan.chosen == {(j, "attn.qkv_proj.base_layer") for j in range(len(blocks))}
        assert plan.num_bytes == QKV_OUTPUTS_BYTES
    assert cache.peak_bytes == plan.num_bytes and cache.kept_bytes == 0
    for step, (ours, reference) in enumerate(zip(cached, plain, strict=True)):
        assert abs(ours - reference) <= LOSS_RTOL * abs(reference), (step, cached, plain)
    expected_trainer = make_trainer(overrides, stream=True)
    try:
        for _ in range(3):
            expected_trainer.step()
        for name, p in expected_trainer.model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(adapters[name], p.detach(), rtol=1e-5, atol=1e-7)
    finally:
        expected_trainer.close()


def test_outputs_larger_than_planned_are_not_kept_past_the_budget():
    """The plan assumes an element size (bf16 under autocast); outputs that come out larger (here fp32 on the
    CPU, planned at 2 bytes) stop being kept where they would pass the budget, and the run is unchanged."""
    overrides = SHAPES["llama"] + ["quant.lora_dropout=0.1"]
    plain = run_steps(make_trainer(overrides, stream=True), 2)
    budget_gb = 1.1 * QKV_OUTPUTS_BYTES / 2**30
    trainer = make_trainer(overrides + [f"quant.stream_cache_gb={budget_gb}"], stream=True)
    cache = trainer.runtime.cache
    cache.element_bytes = 2  # the plan now expects half the bytes each output really has
    cached = run_steps(trainer, 2)
    assert cache.plan.num_bytes <= budget_gb * 2**30 < 2 * cache.plan.num_bytes  # planned as if all fit
    assert 0 < cache.peak_bytes <= budget_gb * 2**30 < 2 * cache.plan.num_bytes
    for ours, reference in zip(cached, plain, strict=True):
        assert abs(ours - reference) <= LOSS_RTOL * abs(reference), (cached, plain)


@pytest.mark.parametrize("overrides, message", [
    (["quant.stream_cache_gb=1"], "quant.stream=true"),
    (["quant.stream=true", "quant.stream_cache_gb=-1"], "quant.stream_cache_gb"),
    (["quant.stream=true", "quant.stream_cache_gb=8", "offload.gpu_memory_gb=8"], "lower it"),
])
def test_stream_cache_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml("configs/tiny.yaml", ["quant.mode=qlora", *overrides])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kept_outputs_change_nothing_in_bf16_on_a_gpu():
    """On the GPU in bf16 the kept outputs are the recompute's own values (same kernel, same input), so the
    losses match the plain streamed run's; and the plan keeps every block linear but down_proj (never kept:
    its recompute output is never read) within 1 GiB here."""
    plain = run_steps(make_trainer(SHAPES["llama"] + GPU_TINY, stream=True), 3)
    trainer = make_trainer(SHAPES["llama"] + GPU_TINY + ["quant.stream_cache_gb=1"], stream=True)
    cache = trainer.runtime.cache
    cached = run_steps(trainer, 3)
    assert len(cache.plan.chosen) == 4 * (len(cache.linears[0]) - 1) and cache.peak_bytes == cache.plan.num_bytes
    assert cache.plan.num_bytes == 4 * (2 * 64) * (256 + 2 * 128 + 256 + 2 * 768) * 2  # bf16 qkv, o, gate_up outputs
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_streamed_qlora_matches_eager_in_bf16_on_a_gpu():
    """train.compile with quant.stream: Inductor's kernels through bitsandbytes' and peft's layers, with kept
    outputs and the skipped down projection, give the eager run's losses to bf16 rounding (no dropout here:
    compiled dropout draws other masks than eager dropout)."""
    overrides = SHAPES["llama"] + GPU_TINY + ["quant.lora_dropout=0.0", "quant.stream_cache_gb=0.001"]
    eager = run_steps(make_trainer(overrides, stream=True), 6)
    compiled = run_steps(make_trainer(overrides + ["train.compile=true"], stream=True), 6)
    assert compiled[-1] < compiled[0]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_recompute_draws_the_forward_dropout_masks_on_a_gpu():
    """The streamed recompute restores the RNG state of the block's forward; compiled (Inductor's own random
    kernels, one graph without grad, one with it) it must still draw the forward's masks. The two graphs
    fuse differently, so in bf16 their outputs differ by rounding (measured on the H100: at most 27.9 where
    outputs reach ~1000, 3 bf16 steps); other masks move them by the LoRA branch itself (~1000). The test
    compares the two distances."""
    trainer = make_trainer(SHAPES["llama"] + GPU_TINY + ["quant.lora_dropout=0.3", "train.compile=true"], stream=True)
    runtime = trainer.runtime
    try:
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:  # zero at init, which would hide the LoRA branch and its dropout
                torch.nn.init.normal_(parameter, std=0.5)
        x_BSD = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16)
        with runtime.resident(1), runtime.autocast():
            state = runtime._rng_state()
            with torch.no_grad():
                forward = runtime._block(1, x_BSD).float()
                other_masks = runtime._block(1, x_BSD).float()
            with runtime._restored_rng(state):
                recompute = runtime._block(1, x_BSD.clone().requires_grad_(True)).detach().float()
        rounding, masks = (recompute - forward).norm(), (other_masks - forward).norm()
        assert rounding < 0.1 * masks, (rounding, masks)
    finally:
        trainer.close()


def test_backward_recomputes_one_block_ahead_of_its_backprop(monkeypatch):
    """The streamed backward's steady state: block j-1's recompute is issued before block j's backprop (the
    GPU runs it while the host sets that backprop up), so two blocks' weights are installed at once."""
    trainer = make_trainer(SHAPES["llama"] + ["model.num_layers=4", "offload.prefetch_depth=1"], stream=True)
    runtime = trainer.runtime
    events = []
    block = runtime._block
    monkeypatch.setattr(runtime, "_block", lambda j, x: events.append(("block", j, torch.is_grad_enabled())) or block(j, x))
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda y, *a, **k: events.append(("backprop",)) or backward(y, *a, **k))
    installed, peak = set(), [0]
    for j, payload in enumerate(runtime.payloads):
        install, clear = payload.install, payload.clear
        monkeypatch.setattr(payload, "install", lambda flat, j=j, install=install: installed.add(j) or
                            peak.__setitem__(0, max(peak[0], len(installed))) or install(flat))
        monkeypatch.setattr(payload, "clear", lambda j=j, clear=clear: installed.discard(j) or clear())
    try:
        trainer.step()
    finally:
        trainer.close()
    first_recompute = events.index(("block", 3, True))  # before it: the forward, and the head's chunk backprops
    backward_events = events[first_recompute:]
    # Blocks 3..0 recomputed; each backprop of block j comes after the recompute of j-1 was issued.
    assert backward_events == [("block", 3, True), ("block", 2, True), ("backprop",), ("block", 1, True), ("backprop",),
                               ("block", 0, True), ("backprop",), ("backprop",)]
    assert peak[0] == 2  # installed at once: the block backpropagating and the one recomputed ahead
