"""Model definitions (GPT and LLaMA layouts), named presets, and Hugging Face checkpoint I/O.

Imports only torch and safetensors: `transformers` is never needed to load or save a model.
"""

from fuyou.models.hf import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    from_pretrained,
    iter_pretrained_tensors,
    load_config,
    save_pretrained,
    to_hf_state_dict,
)
from fuyou.models.presets import PRESETS, get_preset, resolve_config
from fuyou.models.transformer import Block, Initializer, Transformer, TransformerConfig, build_model, init_parameters

__all__ = [
    "PRESETS",
    "Block",
    "Initializer",
    "Transformer",
    "TransformerConfig",
    "build_model",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state_dict",
    "from_pretrained",
    "get_preset",
    "resolve_config",
    "init_parameters",
    "iter_pretrained_tensors",
    "load_config",
    "save_pretrained",
    "to_hf_state_dict",
]
