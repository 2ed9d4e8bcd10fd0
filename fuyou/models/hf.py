"""Hugging Face checkpoints: config.json and safetensors weights, read and written without `transformers`.

Supported model types: gpt2 (GPT2LMHeadModel), llama, qwen2 and mistral (all the "llama" family). Each of
our tensors is built from one or more HF tensors by a `Rule`, and the same rules run backwards on export,
so the two directions cannot drift apart:
    copy       same tensor under another name
    transpose  GPT-2's Conv1D stores weights [in, out]; nn.Linear wants [out, in]
    concat     our fused q/k/v (and gate/up) is the HF pieces stacked along dim 0

Exports always use model types that `transformers` loads back exactly: gpt2, llama, or qwen2 when q/k/v
carry biases (Llama's `attention_bias` would also bias o_proj, which our layout does not have).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fuyou.errors import ModelError
from fuyou.models.transformer import Transformer, TransformerConfig, build_model

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors HF checkpoints may carry that are not parameters: GPT-2's causal-mask buffers and old Llama
# checkpoints' rotary inverse frequencies.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Rule:
    """How one of our tensors is made from HF tensors (see the module docstring)."""

    hf_names: tuple[str, ...]
    kind: str = "copy"  # "copy" | "transpose" | "concat"
    split_sizes: tuple[int, ...] = ()  # rows of each HF piece, for "concat"


def _gpt2_rules(config: TransformerConfig) -> dict[str, Rule]:
    rules = {
        "token_embedding.weight": Rule(("transformer.wte.weight",)),
        "position_embedding.weight": Rule(("transformer.wpe.weight",)),
    }
    ours_to_hf = {
        "attn_norm": "ln_1", "attn.qkv_proj": "attn.c_attn", "attn.o_proj": "attn.c_proj",
        "mlp_norm": "ln_2", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj",
    }
    for j in range(config.num_layers):
        for ours, hf in ours_to_hf.items():
            is_conv1d = not ours.endswith("norm")
            kind = "transpose" if is_conv1d else "copy"
            rules[f"blocks.{j}.{ours}.weight"] = Rule((f"transformer.h.{j}.{hf}.weight",), kind)
            rules[f"blocks.{j}.{ours}.bias"] = Rule((f"transformer.h.{j}.{hf}.bias",))
    rules["final_norm.weight"] = Rule(("transformer.ln_f.weight",))
    rules["final_norm.bias"] = Rule(("transformer.ln_f.bias",))
    return rules


def _llama_rules(config: TransformerConfig) -> dict[str, Rule]:
    rules = {"token_embedding.weight": Rule(("model.embed_tokens.weight",))}
    kv_rows = config.kv_heads * config.head_dim
    qkv_rows = (config.num_heads * config.head_dim, kv_rows, kv_rows)
    for j in range(config.num_layers):
        hf, ours = f"model.layers.{j}.", f"blocks.{j}."
        qkv = [f"{hf}self_attn.{name}_proj" for name in ("q", "k", "v")]
        rules[ours + "attn_norm.weight"] = Rule((hf + "input_layernorm.weight",))
        rules[ours + "attn.qkv_proj.weight"] = Rule(tuple(p + ".weight" for p in qkv), "concat", qkv_rows)
        if config.qkv_bias:
            rules[ours + "attn.qkv_proj.bias"] = Rule(tuple(p + ".bias" for p in qkv), "concat", qkv_rows)
        rules[ours + "attn.o_proj.weight"] = Rule((hf + "self_attn.o_proj.weight",))
        rules[ours + "mlp_norm.weight"] = Rule((hf + "post_attention_layernorm.weight",))
        rules[ours + "mlp.gate_up_proj.weight"] = Rule(
            (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), "concat", (config.ffn_size, config.ffn_size)
        )
        rules[ours + "mlp.down_proj.weight"] = Rule((hf + "mlp.down_proj.weight",))
    rules["final_norm.weight"] = Rule(("model.norm.weight",))
    return rules


def state_dict_rules(config: TransformerConfig) -> dict[str, Rule]:
    """For each of our parameter names (in `Transformer.state_dict()` order), how it maps to HF names."""
    rules = _gpt2_rules(config) if config.family == "gpt" else _llama_rules(config)
    if not config.tie_embeddings:
        rules["lm_head.weight"] = Rule(("lm_head.weight",))
    return rules


def _canonical_hf_name(config: TransformerConfig, name: str) -> str:
    # A bare GPT2Model / LlamaModel checkpoint (e.g. the original "gpt2" upload) lacks the wrapper prefix.
    prefix = "transformer." if config.family == "gpt" else "model."
    return name if name.startswith((prefix, "lm_head.")) else prefix + name


def _check_hf_names(config: TransformerConfig, names: set[str], where: str) -> None:
    expected = {hf for rule in state_dict_rules(config).values() for hf in rule.hf_names}
    missing = sorted(expected - names)
    unexpected = sorted(
        name for name in names - expected
        if not name.endswith(IGNORED_SUFFIXES) and not (config.tie_embeddings and name == "lm_head.weight")
    )
    if missing or unexpected:
        raise ModelError(
            f"weights in {where} do not match the config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); check that config.json belongs to these weights"
        )


def _apply_rule(rule: Rule, fetch: Callable[[str], torch.Tensor]) -> torch.Tensor:
    pieces = [fetch(name) for name in rule.hf_names]
    if rule.kind == "transpose":
        return pieces[0].t().contiguous()
    if rule.kind == "concat":
        return torch.cat(pieces, dim=0)
    return pieces[0]


def _unapply_rule(rule: Rule, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if rule.kind == "transpose":
        yield rule.hf_names[0], tensor.t().contiguous()
    elif rule.kind == "concat":
        # clone: safetensors refuses tensors that share storage, and split() returns views.
        for name, piece in zip(rule.hf_names, tensor.split(list(rule.split_sizes), dim=0), strict=True):
            yield name, piece.clone()
    else:
        yield rule.hf_names[0], tensor


def from_hf_state_dict(config: TransformerConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a HF state dict to our parameter names (Conv1D transposed, q/k/v and gate/up fused).

    Args:
        config: the model the weights belong to.
        state_dict: HF names -> tensors; with or without the `transformer.` / `model.` prefix.

    Returns:
        Our names -> tensors (same devices and dtypes), ready for `Transformer.load_state_dict`.

    Raises:
        ModelError: tensors are missing or unexpected for `config`.
    """
    actual_name = {_canonical_hf_name(config, name): name for name in state_dict}
    _check_hf_names(config, set(actual_name), "the state dict")
    fetch = lambda name: state_dict[actual_name[name]]  # noqa: E731
    return {ours: _apply_rule(rule, fetch) for ours, rule in state_dict_rules(config).items()}


def _iter_hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    parameters = dict(model.named_parameters())
    for ours, rule in state_dict_rules(model.config).items():
        yield from _unapply_rule(rule, parameters[ours].detach())


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our model's weights under HF names (GPT2LMHeadModel / LlamaForCausalLM / Qwen2ForCausalLM layout).

    Tied models omit `lm_head.weight`, as HF does. Copied tensors share memory with the model; transposed
    and split ones are new.
    """
    return dict(_iter_hf_tensors(model))


def _get(hf_config: dict, key: str, default=None, *, required: bool = False):
    if required and key not in hf_config:
        raise ModelError(f"config.json lacks {key!r}; it is not a complete {hf_config.get('model_type')} config")
    value = hf_config.get(key, default)
    return default if value is None else value


def _reject(hf_config: dict, key: str, supported_value, why: str) -> None:
    value = hf_config.get(key, supported_value)
    if value is not None and value != supported_value:
        raise ModelError(f"config.json sets {key}={value!r}, which fuyou does not support ({why})")


def _gpt2_config(hf_config: dict) -> TransformerConfig:
    activation = _get(hf_config, "activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ModelError(f"config.json sets activation_function={activation!r}; fuyou's GPT layout uses gelu_new")
    _reject(hf_config, "scale_attn_weights", True, "attention is always scaled by 1/sqrt(head_dim)")
    _reject(hf_config, "scale_attn_by_inverse_layer_idx", False, "no per-layer attention scaling")
    _reject(hf_config, "add_cross_attention", False, "decoder-only models only")
    return TransformerConfig(
        family="gpt",
        vocab_size=_get(hf_config, "vocab_size", required=True),
        hidden_size=_get(hf_config, "n_embd", required=True),
        num_layers=_get(hf_config, "n_layer", required=True),
        num_heads=_get(hf_config, "n_head", required=True),
        intermediate_size=_get(hf_config, "n_inner"),
        max_seq_len=_get(hf_config, "n_positions", required=True),
        norm_eps=_get(hf_config, "layer_norm_epsilon", 1e-5),
        tie_embeddings=_get(hf_config, "tie_word_embeddings", True),
    )


def _llama_config(hf_config: dict) -> TransformerConfig:
    model_type = hf_config["model_type"]
    _reject(hf_config, "hidden_act", "silu", "the llama family uses SwiGLU with silu")
    _reject(hf_config, "mlp_bias", False, "the MLP has no biases")
    _reject(hf_config, "attention_bias", False, "Llama's attention_bias also biases o_proj; use a qwen2 config")
    # transformers >= 5 nests RoPE settings in `rope_parameters`; older files use `rope_theta`/`rope_scaling`.
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"config.json uses rope_type {rope_type!r}; fuyou implements only the default RoPE")
    hidden_size = _get(hf_config, "hidden_size", required=True)
    num_heads = _get(hf_config, "num_attention_heads", required=True)
    _reject(hf_config, "head_dim", hidden_size // num_heads, "head_dim must be hidden_size / num_attention_heads")
    max_seq_len = _get(hf_config, "max_position_embeddings", 2048)
    uses_window = model_type == "mistral" or hf_config.get("use_sliding_window", False)
    window = hf_config.get("sliding_window") if uses_window else None
    if window is not None and window < max_seq_len:
        # Full causal attention equals sliding-window attention on sequences no longer than the window.
        warnings.warn(
            f"sliding-window attention is not implemented: max_seq_len lowered from {max_seq_len} to the "
            f"window {window}, where full attention gives the same result",
            stacklevel=3,
        )
        max_seq_len = window
    return TransformerConfig(
        family="llama",
        vocab_size=_get(hf_config, "vocab_size", required=True),
        hidden_size=hidden_size,
        num_layers=_get(hf_config, "num_hidden_layers", required=True),
        num_heads=num_heads,
        num_kv_heads=_get(hf_config, "num_key_value_heads"),
        intermediate_size=_get(hf_config, "intermediate_size", required=True),
        max_seq_len=max_seq_len,
        norm_eps=_get(hf_config, "rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", _get(hf_config, "rope_theta", 10000.0)),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=_get(hf_config, "tie_word_embeddings", False),
    )


def config_from_hf(hf_config: dict) -> TransformerConfig:
    """Our config from a HF config.json dict (gpt2, llama, qwen2 or mistral).

    Raises:
        ModelError: unsupported model_type, a missing key, or a feature fuyou does not implement.
    """
    model_type = hf_config.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf_config)
    if model_type in ("llama", "qwen2", "mistral"):
        return _llama_config(hf_config)
    raise ModelError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def config_to_hf(config: TransformerConfig) -> dict:
    """A HF config.json dict that `transformers.AutoModelForCausalLM` loads into the same model.

    Dropouts are 0 because our model has none. "gpt" -> gpt2; "llama" -> llama, or qwen2 with q/k/v bias.
    """
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings, "initializer_range": 0.02}
    if config.family == "gpt":
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **common,
            "n_embd": config.hidden_size, "n_layer": config.num_layers, "n_head": config.num_heads,
            "n_inner": config.intermediate_size, "n_positions": config.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps, "scale_attn_weights": True,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            # GPT2Config defaults bos/eos to 50256, GPT-2's <|endoftext|>, which a smaller vocabulary lacks.
            **({} if config.vocab_size > 50256 else {"bos_token_id": None, "eos_token_id": None}),
        }
    llama = {
        **common,
        "hidden_size": config.hidden_size, "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_dropout": 0.0,
    }
    if config.qkv_bias:
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **llama, "use_sliding_window": False}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **llama, "attention_bias": False,
            "mlp_bias": False}


def load_config(directory: str | os.PathLike) -> TransformerConfig:
    """Read `directory/config.json` into our config.

    Raises:
        ModelError: the directory or config.json is missing or unreadable, or the model is unsupported.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(
            f"model directory {str(directory)!r} does not exist; pass a local directory holding config.json "
            "and *.safetensors (fuyou never downloads)"
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ModelError(f"{config_path} is missing; a model directory needs the HF config.json beside its weights")
    try:
        hf_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{config_path} is not valid JSON ({error}); re-save the model") from None
    return config_from_hf(hf_config)


def _weight_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        missing_files = sorted({file for file in weight_map.values() if not (directory / file).is_file()})
        if missing_files:
            raise ModelError(f"{directory / INDEX_FILE} names missing shard(s) {missing_files[:3]}; re-download them")
        return {name: directory / file for name, file in weight_map.items()}
    if (directory / SINGLE_WEIGHTS_FILE).is_file():
        with safe_open(directory / SINGLE_WEIGHTS_FILE, framework="pt") as handle:
            return {name: directory / SINGLE_WEIGHTS_FILE for name in handle.keys()}
    raise ModelError(
        f"no {SINGLE_WEIGHTS_FILE} or {INDEX_FILE} in {directory}; fuyou reads safetensors only "
        "(re-save with save_pretrained(..., safe_serialization=True))"
    )


def iter_pretrained_tensors(
    directory: str | os.PathLike, config: TransformerConfig | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our name, CPU tensor in its stored dtype) one at a time, reading each shard lazily.

    For loaders that place weights themselves (e.g. straight into an offload store) without ever holding
    the whole model in memory.

    Raises:
        ModelError: as `load_config`, or the weights are missing or do not match the config.
    """
    config = load_config(directory) if config is None else config
    directory = Path(directory)
    files = {_canonical_hf_name(config, name): (name, path) for name, path in _weight_files(directory).items()}
    _check_hf_names(config, set(files), str(directory))
    with contextlib.ExitStack() as stack:
        handles = {}

        def fetch(name: str) -> torch.Tensor:
            stored_name, path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            return handles[path].get_tensor(stored_name)

        for ours, rule in state_dict_rules(config).items():
            yield ours, _apply_rule(rule, fetch)


def from_pretrained(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Load a HF-format checkpoint (single or sharded safetensors) into our `Transformer`.

    Args:
        directory: local directory with config.json and model.safetensors or an index plus shards.
        device: where the parameters go; each tensor is moved as it is read.
        dtype: parameter dtype; None keeps the dtype the weights are stored in.

    Raises:
        ModelError: missing directory, config or weights; unsupported model_type; missing or unexpected tensors.
    """
    config = load_config(directory)
    model = build_model(config, device="meta")
    state_dict = {
        name: tensor.to(device=device, dtype=dtype or tensor.dtype)
        for name, tensor in iter_pretrained_tensors(directory, config)
    }
    # assign=True adopts the loaded tensors instead of copying into meta parameters.
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def save_pretrained(model: Transformer, directory: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors weights in HF layout, sharded with an index past `max_shard_bytes`.

    Shards are written as they fill, so saving needs memory for one shard, not a second copy of the model.
    Earlier model*.safetensors* files in `directory` are removed first: HF prefers model.safetensors over
    an index, so a stale single file would shadow new shards.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("model*.safetensors*"):
        stale.unlink()
    dtype = next(model.parameters()).dtype
    hf_config = {**config_to_hf(model.config), "torch_dtype": str(dtype).removeprefix("torch.")}
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")

    shard_paths, weight_map, shard, shard_bytes, total_bytes = [], {}, {}, 0, 0

    def flush() -> None:
        path = directory / f"model-{len(shard_paths) + 1:05d}.partial"
        save_file(shard, path, metadata={"format": "pt"})
        shard_paths.append(path)
        weight_map.update(dict.fromkeys(shard, len(shard_paths) - 1))

    for name, tensor in _iter_hf_tensors(model):
        num_bytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + num_bytes > max_shard_bytes:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = tensor.cpu()
        shard_bytes += num_bytes
        total_bytes += num_bytes
    flush()

    if len(shard_paths) == 1:
        shard_paths[0].rename(directory / SINGLE_WEIGHTS_FILE)
        return
    names = [f"model-{i + 1:05d}-of-{len(shard_paths):05d}.safetensors" for i in range(len(shard_paths))]
    for path, name in zip(shard_paths, names, strict=True):
        path.rename(directory / name)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
