"""Model definitions and presets: shapes, parameter counts, validation, initialisation, block purity.

Shape legend: B batch, S sequence, D hidden, V vocabulary.
"""

import subprocess
import sys

import pytest
import torch

from fuyou.errors import ModelError
from fuyou.models import PRESETS, Initializer, Transformer, TransformerConfig, build_model, get_preset

TINY = ("tiny-gpt3", "tiny-llama")
# Variants that switch on every optional piece of the layouts.
VARIANTS = {
    "gpt-untied": get_preset("tiny-gpt3").replace(tie_embeddings=False, intermediate_size=96),
    "llama-qwen-like": get_preset("tiny-llama").replace(qkv_bias=True, tie_embeddings=True),
    "llama-default-ffn": get_preset("tiny-llama").replace(intermediate_size=None, num_kv_heads=None),
}


def _tiny_configs():
    return {**{name: get_preset(name) for name in TINY}, **VARIANTS}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_without_allocating(name):
    model = build_model(get_preset(name), device="meta")
    assert all(parameter.is_meta for parameter in model.parameters())
    assert model.num_parameters() == get_preset(name).num_parameters()
    assert len(model.blocks) == get_preset(name).num_layers


@pytest.mark.parametrize(
    ("name", "published"),
    [("gpt3-13b", 13e9), ("gpt3-175b", 175e9), ("llama2-7b", 6.74e9), ("llama3-8b", 8.03e9), ("qwen2-0.5b", 0.494e9)],
)
def test_preset_parameter_counts_match_published_sizes(name, published):
    assert get_preset(name).num_parameters() == pytest.approx(published, rel=0.03)


@pytest.mark.parametrize("name", list(_tiny_configs()))
def test_analytic_parameter_count_equals_built_count(name):
    config = _tiny_configs()[name]
    model = build_model(config, seed=0)
    assert config.num_parameters() == model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_tiny_presets_fit_the_byte_tokenizer_and_exercise_gqa():
    for name in TINY:
        config = get_preset(name)
        assert config.vocab_size >= 259 and config.hidden_size <= 256 and config.max_seq_len >= 256
    assert get_preset("tiny-llama").kv_heads < get_preset("tiny-llama").num_heads


@pytest.mark.parametrize(
    "changes",
    [
        {"family": "bert"},
        {"hidden_size": 130},  # not divisible by 4 heads
        {"num_kv_heads": 3},  # 4 heads not divisible by 3
        {"num_layers": 0},
        {"intermediate_size": -1},
        {"norm_eps": 0.0},
    ],
)
def test_invalid_configs_raise_model_error(changes):
    with pytest.raises(ModelError):
        get_preset("tiny-llama").replace(**changes)


def test_gpt_family_rejects_grouped_kv_heads_and_replace_rejects_unknown_fields():
    with pytest.raises(ModelError, match="num_kv_heads"):
        get_preset("tiny-gpt3").replace(num_kv_heads=2)
    with pytest.raises(ModelError, match="num_layer"):
        get_preset("tiny-gpt3").replace(num_layer=3)
    with pytest.raises(ModelError, match="tiny-gpt3"):
        get_preset("gpt-4")


def test_resolved_properties():
    config = TransformerConfig(family="llama", vocab_size=32, hidden_size=4096, num_layers=1, num_heads=32)
    assert (config.head_dim, config.kv_heads, config.ffn_size) == (128, 32, 11008)  # LLaMA-7B's 11008
    assert get_preset("tiny-gpt3").ffn_size == 4 * 128


def test_seeded_build_is_deterministic_and_follows_global_rng_without_seed():
    config = get_preset("tiny-llama")
    first, second = build_model(config, seed=3), build_model(config, seed=3)
    torch.manual_seed(3)
    from_global = build_model(config)
    other = build_model(config, seed=4)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name])
        assert torch.equal(value, from_global.state_dict()[name])
    assert not torch.equal(first.token_embedding.weight, other.token_embedding.weight)


def test_initialisation_follows_gpt2():
    config = get_preset("tiny-gpt3").replace(vocab_size=4096)
    model = build_model(config, seed=0)
    block = model.blocks[0]
    assert torch.all(block.attn_norm.weight == 1) and torch.all(block.attn_norm.bias == 0)
    assert torch.all(block.attn.qkv_proj.bias == 0)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / (2 * config.num_layers) ** 0.5
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)


def test_build_in_bfloat16_matches_float32_init_up_to_rounding():
    config = get_preset("tiny-llama")
    bf16, fp32 = build_model(config, dtype=torch.bfloat16, seed=0), build_model(config, seed=0)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert torch.equal(bf16.blocks[1].attn.qkv_proj.weight, fp32.blocks[1].attn.qkv_proj.weight.bfloat16())
    logits_BSV = bf16(torch.randint(0, config.vocab_size, (2, 8)))
    assert logits_BSV.dtype == torch.bfloat16 and torch.isfinite(logits_BSV).all()


@pytest.mark.parametrize("name", list(_tiny_configs()))
def test_forward_is_embed_blocks_head_and_causal(name):
    config = _tiny_configs()[name]
    model = build_model(config, seed=0)
    input_ids_BS = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits_BSV = model(input_ids_BS)
    assert logits_BSV.shape == (2, 12, config.vocab_size)

    x_BSD = model.embed(input_ids_BS)
    for block in model.blocks:
        x_BSD = block(x_BSD)
    torch.testing.assert_close(model.head(x_BSD), logits_BSV, rtol=0, atol=0)

    # Causal: changing the last token leaves every earlier position's logits unchanged.
    changed_BS = input_ids_BS.clone()
    changed_BS[:, -1] = (changed_BS[:, -1] + 1) % config.vocab_size
    torch.testing.assert_close(model(changed_BS)[:, :-1], logits_BSV[:, :-1])


def test_block_is_a_pure_function_of_its_input():
    model = build_model(get_preset("tiny-llama"), seed=0)
    x_BSD = torch.randn(2, 10, 128, generator=torch.Generator().manual_seed(1))
    block = model.blocks[1]
    first = block(x_BSD)
    block(torch.randn(3, 7, 128))  # no state carried from one call to the next
    torch.testing.assert_close(block(x_BSD), first, rtol=0, atol=0)
    # Positions come from S inside the block, so a prefix gives the prefix of the output.
    torch.testing.assert_close(block(x_BSD[:, :4]), first[:, :4])


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_output_unused_skips_the_last_gemm_and_leaves_every_gradient_unchanged(name, autocast):
    """Block.forward(output_unused=True): the down projection's forward GEMM is not run (2·T·F·D FLOPs
    fewer, counted by torch's FLOP counter over forward and backward), and the input and parameter
    gradients are bitwise those of the plain forward, in fp32 and under bf16 autocast."""
    from torch.utils.flop_counter import FlopCounterMode

    config = get_preset(name)
    block = build_model(config, seed=0).blocks[1]
    generator = torch.Generator().manual_seed(3)
    B, S, D = 2, 12, config.hidden_size
    x_BSD = torch.randn(B, S, D, generator=generator)
    grad_BSD = torch.randn(B, S, D, generator=generator)
    results = {}
    for unused in (False, True):
        block.zero_grad()
        x_leaf = x_BSD.clone().requires_grad_()
        with FlopCounterMode(display=False) as flops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y_BSD = block(x_leaf, output_unused=unused)
            y_BSD.backward(grad_BSD.to(y_BSD.dtype))
        results[unused] = (flops.get_total_flops(), x_leaf.grad, {n: p.grad.clone() for n, p in block.named_parameters()})
    (flops_plain, dx_plain, grads_plain), (flops_unused, dx_unused, grads_unused) = results[False], results[True]
    assert flops_plain - flops_unused == 2 * B * S * config.ffn_size * D
    torch.testing.assert_close(dx_unused, dx_plain, rtol=0, atol=0)
    assert grads_unused.keys() == grads_plain.keys()
    for key in grads_plain:
        assert grads_unused[key].dtype == grads_plain[key].dtype, key
        torch.testing.assert_close(grads_unused[key], grads_plain[key], rtol=0, atol=0, msg=key)


def test_tied_head_reuses_the_embedding_and_trains_it_from_both_ends():
    model = build_model(get_preset("tiny-gpt3"), seed=0)
    assert model.lm_head is None
    names = [name for name, _ in model.named_parameters()]
    assert names.count("token_embedding.weight") == 1 and not any(name.startswith("lm_head") for name in names)
    input_ids_BS = torch.zeros(1, 4, dtype=torch.long)
    model(input_ids_BS).sum().backward()
    # Token 0 is the only one embedded, so gradient on other rows can only come through the head.
    assert model.token_embedding.weight.grad[1:].abs().sum() > 0


def test_sequence_longer_than_max_seq_len_is_a_model_error():
    model = build_model(get_preset("tiny-llama").replace(max_seq_len=8), seed=0)
    with pytest.raises(ModelError, match="max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_constructor_is_a_plain_module_and_models_import_no_transformers():
    assert isinstance(build_model(get_preset("tiny-gpt3"), device="meta"), Transformer)
    code = "import sys, fuyou.models; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt3"])  # untied head (drawn after the blocks), tied
def test_initializing_piece_by_piece_from_meta_gives_build_models_weights(name):
    config = get_preset(name)
    model = build_model(config, device="meta")
    initialize = Initializer(model, seed=3)
    pieces = initialize.pieces()
    assert [p for p in pieces if p in list(model.blocks)] == list(model.blocks)
    for piece in pieces:
        initialize.materialize(piece)
    for (key, expected), got in zip(build_model(config, seed=3).state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, expected), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the padded head GEMM is the CUDA path")
def test_cuda_head_pads_an_odd_vocabulary_without_changing_values_or_gradients():
    config = get_preset("tiny-gpt3").replace(vocab_size=1001)
    model = build_model(config, device="cuda", dtype=torch.float32, seed=0)
    x_BSD = torch.randn(2, 8, config.hidden_size, device="cuda", requires_grad=True)
    logits_BSV = model.head(x_BSD)
    assert logits_BSV.shape == (2, 8, 1001)
    grad_BSV = torch.randn_like(logits_BSV)
    logits_BSV.backward(grad_BSV)
    padded_grads = (x_BSD.grad.clone(), model.token_embedding.weight.grad.clone())
    x_BSD.grad, model.token_embedding.weight.grad = None, None
    plain_BSV = torch.nn.functional.linear(model.final_norm(x_BSD), model.token_embedding.weight)
    plain_BSV.backward(grad_BSV)
    torch.testing.assert_close(logits_BSV, plain_BSV)
    torch.testing.assert_close(padded_grads[0], x_BSD.grad)
    torch.testing.assert_close(padded_grads[1], model.token_embedding.weight.grad)
