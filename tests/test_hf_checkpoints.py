"""Hugging Face checkpoint parity: transformers' models and ours give the same fp32 logits both ways.

For each supported model type a tiny random HF model is saved by transformers, loaded by our
`from_pretrained`, saved by our `save_pretrained`, and loaded back by `AutoModelForCausalLM`.
Tolerance: relative error ||ours - theirs|| / ||theirs|| <= 1e-5 in fp32 (only summation order differs).

Shape legend: B batch, S sequence, V vocabulary.
"""

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fuyou.errors import ModelError
from fuyou.models import (
    build_model,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    from_pretrained,
    get_preset,
    iter_pretrained_tensors,
    save_pretrained,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")

RELATIVE_TOLERANCE = 1e-5
SEQ_LEN = 24


def _hf_config(model_type: str):
    # Every model: 2 layers, hidden 64, vocab 512; dropouts are 0 so train/eval mode cannot matter.
    llama_shape = dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, attention_dropout=0.0, bos_token_id=None, eos_token_id=None,
    )
    if model_type == "gpt2":
        return transformers.GPT2Config(
            vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
        )
    if model_type == "llama":  # GQA, untied, non-default rope base
        return transformers.LlamaConfig(**llama_shape, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False)
    if model_type == "qwen2":  # q/k/v bias, tied
        return transformers.Qwen2Config(**llama_shape, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)
    assert model_type == "mistral"
    return transformers.MistralConfig(**llama_shape, num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False)


def _random_hf_model(model_type: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(model_type), attn_implementation="sdpa")
    # HF init leaves biases 0 and norms 1; perturb everything so a mis-mapped bias or norm would show.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.float().eval()


def _hf_save(model, directory, max_shard_size: str) -> None:
    # transformers < 5 writes pickles unless asked; 5+ has no such argument and always writes safetensors.
    safe = {"safe_serialization": True} if "safe_serialization" in inspect.signature(model.save_pretrained).parameters else {}
    model.save_pretrained(directory, max_shard_size=max_shard_size, **safe)


def _hf_load(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def _input_ids_BS(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2", "mistral"])
def test_transformers_checkpoint_round_trip_keeps_logits(model_type, sharded, tmp_path):
    hf_model = _random_hf_model(model_type)
    _hf_save(hf_model, tmp_path / "hf", max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == sharded
    input_ids_BS = _input_ids_BS(512)
    with torch.no_grad():
        reference_BSV = hf_model(input_ids_BS).logits

        ours = from_pretrained(tmp_path / "hf")
        assert _relative_error(ours(input_ids_BS), reference_BSV) <= RELATIVE_TOLERANCE

        save_pretrained(ours, tmp_path / "ours", max_shard_bytes=20_000 if sharded else 5 * 2**30)
        assert (tmp_path / "ours" / "model.safetensors.index.json").is_file() == sharded
        reloaded = _hf_load(tmp_path / "ours")
        assert _relative_error(reloaded(input_ids_BS).logits, reference_BSV) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("name", ["tiny-gpt3", "tiny-llama"])
def test_our_checkpoint_round_trips_exactly_and_keeps_dtype(name, tmp_path):
    model = build_model(get_preset(name), dtype=torch.bfloat16, seed=0)
    save_pretrained(model, tmp_path, max_shard_bytes=50_000)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in loaded.parameters())
    assert from_pretrained(tmp_path, dtype=torch.float32).token_embedding.weight.dtype == torch.float32
    assert [name for name, _ in iter_pretrained_tensors(tmp_path)] == list(model.state_dict())


def test_resaving_a_sharded_model_as_one_file_leaves_no_stale_shards(tmp_path):
    model = build_model(get_preset("tiny-llama"), seed=0)
    save_pretrained(model, tmp_path, max_shard_bytes=50_000)
    save_pretrained(model, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_our_checkpoint_loads_in_transformers_with_same_logits(tmp_path):
    for name in ("tiny-gpt3", "tiny-llama"):
        model = build_model(get_preset(name), seed=0)
        save_pretrained(model, tmp_path / name)
        input_ids_BS = _input_ids_BS(model.config.vocab_size)
        with torch.no_grad():
            error = _relative_error(model(input_ids_BS), _hf_load(tmp_path / name)(input_ids_BS).logits)
        assert error <= RELATIVE_TOLERANCE, name


def test_state_dict_adapters_are_inverse():
    config = get_preset("tiny-llama").replace(qkv_bias=True)
    model = build_model(config, seed=0)
    hf_state_dict = to_hf_state_dict(model)
    assert "model.layers.0.self_attn.k_proj.bias" in hf_state_dict and "lm_head.weight" in hf_state_dict
    ours = from_hf_state_dict(config, hf_state_dict)
    for key, value in model.state_dict().items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize(
    "config",
    [get_preset("tiny-gpt3"), get_preset("tiny-llama"), get_preset("tiny-llama").replace(qkv_bias=True)],
    ids=["gpt2", "llama", "qwen2"],
)
def test_config_round_trips_through_hf(config):
    assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config


def test_config_to_hf_exports_qkv_bias_as_qwen2():
    assert config_to_hf(get_preset("tiny-llama").replace(qkv_bias=True))["model_type"] == "qwen2"
    assert config_to_hf(get_preset("tiny-gpt3"))["activation_function"] == "gelu_new"


def test_unsupported_hf_configs_are_model_errors():
    llama = config_to_hf(get_preset("tiny-llama"))
    with pytest.raises(ModelError, match="'bert'.*gpt2, llama, qwen2, mistral"):
        config_from_hf({"model_type": "bert"})
    with pytest.raises(ModelError, match="attention_bias"):
        config_from_hf({**llama, "attention_bias": True})
    with pytest.raises(ModelError, match="llama3"):
        config_from_hf({**llama, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}})
    with pytest.raises(ModelError, match="hidden_size"):
        config_from_hf({key: value for key, value in llama.items() if key != "hidden_size"})


def test_mistral_sliding_window_caps_max_seq_len_with_a_warning():
    mistral = {**config_to_hf(get_preset("tiny-llama")), "model_type": "mistral", "sliding_window": 64}
    with pytest.warns(UserWarning, match="sliding-window"):
        assert config_from_hf(mistral).max_seq_len == 64


def test_legacy_rope_theta_key_is_read():
    legacy = {**config_to_hf(get_preset("tiny-llama")), "rope_theta": 123.0}
    del legacy["rope_parameters"]
    assert config_from_hf(legacy).rope_theta == 123.0


def test_missing_directory_config_or_weights_are_one_line_model_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as error:
        from_pretrained(tmp_path / "nowhere")
    assert "\n" not in str(error.value)
    with pytest.raises(ModelError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(get_preset("tiny-gpt3"))))
    with pytest.raises(ModelError, match="safetensors"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        from_pretrained(tmp_path)


def test_missing_or_unexpected_tensors_are_model_errors(tmp_path):
    save_pretrained(build_model(get_preset("tiny-gpt3"), seed=0), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.bias"]
    weights["transformer.h.2.ln_1.weight"] = torch.ones(128)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"1 missing .*c_fc\.bias.*1 unexpected .*h\.2\.ln_1"):
        from_pretrained(tmp_path)
