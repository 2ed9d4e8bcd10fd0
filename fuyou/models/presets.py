"""Named model shapes: the GPT-3 family Fuyou was evaluated on, common LLaMA-layout models, and tiny
models for tests and CPU runs.

Only shapes live here, never weights: a preset builds a randomly initialised model (`build_model`), or
checks a checkpoint's config. Numbers for released models are copied from their published config.json.
"""

from __future__ import annotations

from fuyou.errors import ModelError
from fuyou.models.transformer import TransformerConfig


def _gpt3(num_layers: int, hidden_size: int, num_heads: int) -> TransformerConfig:
    # GPT-3 paper (Brown et al. 2020), Table 2.1: vocab 50257 (the GPT-2 BPE), context 2048, d_ff = 4 d_model,
    # GPT-2 layout with tied embeddings. (The paper's alternating sparse attention is not modelled.)
    return TransformerConfig(
        family="gpt",
        vocab_size=50257,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_seq_len=2048,
        norm_eps=1e-5,
        tie_embeddings=True,
    )


def _llama_layout(**fields) -> TransformerConfig:
    return TransformerConfig(family="llama", **fields)


PRESETS: dict[str, TransformerConfig] = {
    "gpt3-125m": _gpt3(12, 768, 12),
    "gpt3-350m": _gpt3(24, 1024, 16),
    "gpt3-760m": _gpt3(24, 1536, 16),
    # Table 2.1 prints 24 heads of dim 128 for 1.3B, which is 3072, not d_model 2048; 16 heads of 128 fits.
    "gpt3-1.3b": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    # Table 2.1 prints d_model 5140, which 40 heads do not divide; 5120 = 40 x 128 is what Fuyou and LoHan use.
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
    # meta-llama/Llama-2-7b-hf config.json
    "llama2-7b": _llama_layout(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        intermediate_size=11008, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False,
    ),
    # meta-llama/Llama-2-13b-hf config.json
    "llama2-13b": _llama_layout(
        vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
        intermediate_size=13824, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False,
    ),
    # meta-llama/Llama-2-70b-hf config.json (GQA with 8 K/V heads)
    "llama2-70b": _llama_layout(
        vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        intermediate_size=28672, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False,
    ),
    # meta-llama/Meta-Llama-3-8B config.json (3.0: no rope scaling; 3.1's "llama3" rope type is not modelled)
    "llama3-8b": _llama_layout(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=False,
    ),
    # meta-llama/Meta-Llama-3-70B config.json
    "llama3-70b": _llama_layout(
        vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        intermediate_size=28672, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=False,
    ),
    # Qwen/Qwen2-0.5B config.json: q/k/v bias, tied. max_seq_len is the model card's 32K context
    # (config.json's max_position_embeddings says 131072).
    "qwen2-0.5b": _llama_layout(
        vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
        intermediate_size=4864, max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0,
        qkv_bias=True, tie_embeddings=True,
    ),
    # Qwen/Qwen2-7B-Instruct config.json: q/k/v bias, untied, 32K context.
    "qwen2-7b": _llama_layout(
        vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        intermediate_size=18944, max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0,
        qkv_bias=True, tie_embeddings=False,
    ),
    # mistralai/Mistral-7B-v0.2 (and Instruct-v0.2) config.json: rope 1e6, sliding_window null (full
    # attention over 32K), vocab 32000 (v0.3 grows it to 32768).
    "mistral-7b": _llama_layout(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, max_seq_len=32768, norm_eps=1e-5, rope_theta=1000000.0, tie_embeddings=False,
    ),
    # Tiny models for tests and the CPU default. vocab 512 holds the project's byte-level tokenizer
    # (259 ids); hidden 128 with 4 heads of 32 keeps a forward pass in milliseconds.
    "tiny-gpt3": TransformerConfig(
        family="gpt", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, max_seq_len=256,
    ),
    # tiny-llama exercises GQA (2 K/V heads for 4 query heads) and an untied head.
    "tiny-llama": _llama_layout(
        vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=352, max_seq_len=256, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False,
    ),
}


def get_preset(name: str) -> TransformerConfig:
    """The preset called `name`.

    Raises:
        ModelError: no such preset; the message lists the known names.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def resolve_config(*, preset: str, path: str | None = None, **shape_overrides: int | None) -> TransformerConfig:
    """A model's shape without allocating it: `path`'s config.json if given, else `preset` with the
    shape fields in `shape_overrides` that are not None applied on top.

    Raises:
        ModelError: unknown preset, missing or unreadable model directory, invalid shape.
    """
    if path is not None:
        from fuyou.models.hf import load_config

        return load_config(path)
    return get_preset(preset).replace(**{name: value for name, value in shape_overrides.items() if value is not None})
