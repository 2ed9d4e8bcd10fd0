"""Typed run configuration: a YAML file sets fields, `key=value` overrides set them again.

Every field has a type; a YAML value or an override of the wrong type, or a key that does not
exist, is a `ConfigError` naming the key and where it came from. Integers are accepted where a
float is expected ("lr=1" means 1.0); nothing else is coerced, except that override values are
parsed as YAML scalars and `1e-4`-style strings (which YAML 1.1 reads as text) become floats.

Sections:
    model    which network: a preset name or a local Hugging Face directory, plus shape overrides.
    data     where tokens come from and how they are tokenized and packed.
    train    the optimisation: steps, batch, sequence length, LR schedule, clipping, precision.
    offload  where each state class lives (GPU, CPU, SSD) and the memory caps; read by the Fuyou
             runtime (fuyou.runtime) and its planner; the reference runtime keeps everything on one device.
top level: runtime, device, seed; plan ("manual": the offload section as written; "auto": the
planner chooses placement, micro-batch and prefetch depth for runtime=fuyou) and hardware (the
profile the planner prices with; None measures this machine with a quick probe).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fuyou.errors import ConfigError

RUNTIMES = ("reference", "fuyou")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
PLACEMENTS = ("gpu", "cpu", "ssd")
PARAM_PLACEMENTS = (*PLACEMENTS, "master")  # "master": streamed from the optimizer's fp32 masters (fuyou.runtime)
ACTIVATION_PLACEMENTS = ("gpu", "cpu", "ssd", "none")
NONE_IS_A_CHOICE = ("offload.activations",)  # optional keys whose value "none" is a choice, not null


@dataclass
class ModelConfig:
    """Which network to train.

    `path` (a local Hugging Face directory with config.json and safetensors) wins over `preset`.
    The shape fields override the preset's values when set; they cannot be combined with `path`,
    whose shape is fixed by its weights.
    """

    preset: str = "tiny-llama"
    path: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_seq_len: int | None = None


@dataclass
class DataConfig:
    """Where training tokens come from.

    `source`: "synthetic" (an embedded learnable task, needs no files), "random" (uniform random
    tokens, for throughput runs) or a path to a .txt/.jsonl file or a directory of .txt files.
    `tokenizer`: "auto" (the model directory's tokenizer.json if there is one, else "byte"),
    "byte" (built-in byte-level) or a path to a tokenizer.json or a directory holding one.
    """

    source: str = "synthetic"
    format: str = "auto"
    tokenizer: str = "auto"
    pack: bool = True


@dataclass
class TrainSection:
    """The optimisation.

    One optimizer step consumes `grad_accum` micro-batches of `batch_size` sequences of
    `seq_len` tokens. The learning rate warms up linearly over `warmup_steps`, then follows a
    cosine from `lr` down to `lr * min_lr_ratio` at `steps`.

    `compile`: run every transformer block's forward and backward through one torch.compile graph
    (Inductor fuses the norms, activations, residual adds and casts between the GEMMs; both runtimes,
    with or without activation checkpointing, HALO's quantizers and QLoRA's LoRA branches included;
    fuyou.block_compile). CUDA only; the first step also
    compiles (tens of seconds for a large block). If the compiler fails, the run stops with an error
    naming train.compile=false.
    """

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    activation_checkpointing: bool = False
    precision: str = "auto"
    log_every: int = 1
    save_final: bool = True
    compile: bool = False


@dataclass
class OffloadConfig:
    """Placement of each state class and the memory caps (read by the Fuyou runtime).

    `None` leaves the choice to the runtime's planner. Memory caps are in GiB. `params` "master" keeps
    no compute-precision copy of the block weights: they stream from the fp32 masters of the optimizer
    state (optimizer "cpu") and are cast on the GPU (fuyou.runtime's docstring weighs it against "cpu").
    `outer_optimizer` "gpu": the embeddings, final norm and LM head (resident on the GPU in fp32) keep
    their AdamW moments there and are updated there, not by the CPU optimizer: the step loses its serial
    tail (their gradient out, update, weights back in) for 8 bytes per outer parameter of GPU memory.
    `optimizer_cpu_blocks` (with optimizer "ssd"): blocks 0..k-1 and the embeddings/head keep their
    fp32 masters and moments in CPU RAM, the other blocks on the SSD (None: all on the SSD); the
    split that lets a model larger than RAM or disk alone fit both (fuyou.runtime.Placement says
    why those blocks). `gradient_ring`: when a step is one micro-batch without clipping
    (train.grad_accum 1, train.max_grad_norm null), the fp32 gradients go through this many reusable
    block-sized CPU buffers instead of one accumulator per parameter; 0 keeps the accumulators.
    """

    params: str | None = None
    optimizer: str | None = None
    activations: str | None = None
    optimizer_cpu_blocks: int | None = None
    outer_optimizer: str = "cpu"
    gradient_ring: int = 4
    gpu_memory_gb: float | None = None
    cpu_memory_gb: float | None = None
    ssd_dir: str | None = None
    prefetch_depth: int = 1


@dataclass
class QuantConfig:
    """Optional low-precision paths (see quant/).

    `mode`: "none"; "halo" (every block linear runs its forward, input-gradient and weight-gradient
    GEMMs in FP8 with Hadamard rotations at `halo_level` 0, 1 or 2; both runtimes); "qlora" (frozen
    NF4 base weights from bitsandbytes, trainable LoRA adapters from peft, bitsandbytes' paged AdamW
    with `optimizer_bits` 8 or 32; runtime=reference; final/ holds the adapters in PEFT format, and
    final-merged/ a full model when `save_merged`). `lora_targets`: comma-separated module names
    (qkv_proj, o_proj, gate_up_proj, down_proj, up_proj); None: every block linear. `stream` (qlora):
    each block's NF4 weights live in pinned CPU memory and are fetched to the GPU ahead of use
    (offload.prefetch_depth blocks ahead, under offload.gpu_memory_gb), every block is checkpointed and
    recomputed, the frozen embedding and head are kept in the compute dtype and the loss is taken in
    token chunks (quant/qlora_stream.py); for models whose 4-bit weights exceed the GPU.
    `stream_cache_gb` (stream): GiB of GPU memory for frozen linears' outputs kept from the forward, so the
    recompute skips their GEMMs, the most FLOPs saved per byte first (quant/output_cache.py); 0: none.
    `halo_scaling`: "current" (each FP8 tensor scaled by its own amax) or "delayed" (by the amaxes its
    operand had over the last `halo_amax_history` optimizer steps: the cast needs no reduction first, so
    under train.compile it is one more store of the producer's kernel; quant/delayed_scaling.py;
    runtime=reference).
    """

    mode: str = "none"
    halo_level: int = 1
    halo_scaling: str = "current"
    halo_amax_history: int = 16
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str | None = None
    optimizer_bits: int = 32
    save_merged: bool = False
    stream: bool = False
    stream_cache_gb: float = 0.0


@dataclass
class TrainConfig:
    """A whole run. Build with `TrainConfig.from_yaml(path, overrides)` or field by field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    runtime: str = "reference"
    device: str = "auto"
    seed: int = 0
    plan: str = "manual"
    hardware: str | None = None

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
        """Reads a YAML file (or only defaults if `path` is None), then applies `key=value` overrides.

        Raises:
            ConfigError: missing or malformed file, unknown key, wrong type, invalid value.
        """
        config = cls()
        if path is not None:
            path = Path(path)
            raw = load_yaml(path, missing=f"config file {path} not found; pass an existing YAML file to --config")
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
            _apply_mapping(config, raw, prefix="", origin=str(path))
        for override in overrides:
            key, value = _parse_override(override)
            _set_dotted(config, key, value, origin=f"override '{override}'")
        config.validate()
        return config

    def validate(self) -> None:
        """Checks value ranges and choices; raises ConfigError naming the key."""
        train = self.train
        _choice("runtime", self.runtime, RUNTIMES)
        _choice("device", self.device, DEVICES)
        _choice("plan", self.plan, ("manual", "auto"))
        if self.plan == "auto" and self.runtime != "fuyou":
            raise ConfigError(f"plan=auto places states for runtime=fuyou; set runtime=fuyou (got runtime={self.runtime})")
        _choice("train.precision", train.precision, PRECISIONS)
        _choice("data.format", self.data.format, ("auto", "text", "jsonl"))
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            if getattr(train, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(train, name)}")
        if train.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {train.warmup_steps}")
        if not train.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {train.lr}")
        if not 0 <= train.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {train.min_lr_ratio}")
        if not (0 <= train.beta1 < 1 and 0 <= train.beta2 < 1):
            raise ConfigError(f"train.beta1 and train.beta2 must be in [0, 1), got {train.beta1}, {train.beta2}")
        if train.max_grad_norm is not None and not train.max_grad_norm > 0:
            raise ConfigError(f"train.max_grad_norm must be > 0 or null (no clipping), got {train.max_grad_norm}")
        offload = self.offload
        for name, choices in (("params", PARAM_PLACEMENTS), ("optimizer", PLACEMENTS)):
            if getattr(offload, name) is not None:
                _choice(f"offload.{name}", getattr(offload, name), choices)
        if offload.activations is not None:
            _choice("offload.activations", offload.activations, ACTIVATION_PLACEMENTS)
        _choice("offload.outer_optimizer", offload.outer_optimizer, ("cpu", "gpu"))
        for name in ("gpu_memory_gb", "cpu_memory_gb"):
            value = getattr(offload, name)
            if value is not None and not value > 0:
                raise ConfigError(f"offload.{name} must be > 0 or null, got {value}")
        if offload.prefetch_depth < 0:
            raise ConfigError(f"offload.prefetch_depth must be >= 0, got {offload.prefetch_depth}")
        if offload.gradient_ring < 0:
            raise ConfigError(f"offload.gradient_ring must be >= 0 (0: full-size gradient buffers), got {offload.gradient_ring}")
        if offload.optimizer_cpu_blocks is not None:
            if offload.optimizer_cpu_blocks < 0:
                raise ConfigError(f"offload.optimizer_cpu_blocks must be >= 0 or null, got {offload.optimizer_cpu_blocks}")
            if offload.optimizer not in ("ssd", None):
                raise ConfigError(
                    f"offload.optimizer_cpu_blocks splits the optimizer state between CPU RAM and the SSD; "
                    f"set offload.optimizer=ssd with it (got offload.optimizer={offload.optimizer})"
                )
        quant = self.quant
        _choice("quant.mode", quant.mode, ("none", "halo", "qlora"))
        if quant.halo_level not in (0, 1, 2):
            raise ConfigError(f"quant.halo_level must be 0, 1 or 2, got {quant.halo_level}")
        _choice("quant.halo_scaling", quant.halo_scaling, ("current", "delayed"))
        if quant.halo_amax_history < 1:
            raise ConfigError(f"quant.halo_amax_history must be >= 1 (optimizer steps), got {quant.halo_amax_history}")
        if quant.halo_scaling == "delayed" and self.runtime != "reference":
            raise ConfigError("quant.halo_scaling=delayed runs on runtime=reference (the Fuyou runtime's streamed blocks "
                              "keep no per-block scaling state); set runtime=reference or quant.halo_scaling=current")
        if quant.lora_rank < 1 or not quant.lora_alpha > 0 or not 0 <= quant.lora_dropout < 1:
            raise ConfigError("quant.lora_rank must be >= 1, quant.lora_alpha > 0 and quant.lora_dropout in [0, 1)")
        if quant.optimizer_bits not in (8, 32):
            raise ConfigError(f"quant.optimizer_bits must be 8 or 32, got {quant.optimizer_bits}")
        if quant.mode == "qlora" and self.runtime != "reference":
            raise ConfigError("quant.mode=qlora runs on runtime=reference; quant.stream=true streams its 4-bit blocks from CPU memory")
        if train.compile and self.device == "cpu":
            raise ConfigError("train.compile needs device=cuda (Inductor on the CPU needs a C++ compiler and gains little); drop train.compile")
        if quant.stream_cache_gb < 0 or (quant.stream_cache_gb > 0 and not quant.stream):
            raise ConfigError(f"quant.stream_cache_gb keeps outputs for streamed QLoRA's recompute: set it >= 0 with "
                              f"quant.stream=true (got {quant.stream_cache_gb} with quant.stream={str(quant.stream).lower()})")
        if offload.gpu_memory_gb is not None and quant.stream_cache_gb >= offload.gpu_memory_gb:
            raise ConfigError(f"quant.stream_cache_gb={quant.stream_cache_gb:g} leaves nothing of offload.gpu_memory_gb="
                              f"{offload.gpu_memory_gb:g} for the blocks in flight; lower it")
        if quant.stream and quant.mode != "qlora":
            raise ConfigError(f"quant.stream streams QLoRA's 4-bit blocks; set quant.mode=qlora or drop quant.stream (got quant.mode={quant.mode})")
        model = self.model
        shape_keys = [f.name for f in dataclasses.fields(model) if f.name not in ("preset", "path")]
        if model.path is not None and any(getattr(model, k) is not None for k in shape_keys):
            set_keys = ", ".join(f"model.{k}" for k in shape_keys if getattr(model, k) is not None)
            raise ConfigError(f"{set_keys} cannot change a model loaded from model.path; drop the override")
        for name in shape_keys:
            value = getattr(model, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {value}")

    def with_overrides(self, overrides: typing.Sequence[str], origin: str = "override") -> TrainConfig:
        """A validated copy with `key=value` overrides applied (e.g. a plan's placement)."""
        config = copy.deepcopy(self)
        for override in overrides:
            key, value = _parse_override(override)
            _set_dotted(config, key, value, origin=f"{origin} '{override}'")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data, e.g. to write next to a run's outputs."""
        return dataclasses.asdict(self)


def load_yaml(path: Path, *, missing: str) -> Any:
    """The parsed YAML file ({} when empty); ConfigError `missing` if absent, or file:line if malformed."""
    if not path.is_file():
        raise ConfigError(missing)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    return {} if raw is None else raw


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{override}' is not key=value (e.g. train.steps=50)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not a YAML scalar: keep the text, the type check decides
    return key.strip(), value


def _set_dotted(config: Any, dotted_key: str, value: Any, origin: str) -> None:
    *section_names, leaf = dotted_key.split(".")
    target, prefix = config, ""
    for name in section_names:
        target = _child_section(target, name, prefix, origin)
        prefix += name + "."
    _set_field(target, leaf, value, prefix, origin)


def _apply_mapping(target: Any, mapping: dict, prefix: str, origin: str) -> None:
    for name, value in mapping.items():
        name = str(name)
        hints = typing.get_type_hints(type(target))
        if name in hints and dataclasses.is_dataclass(hints[name]):
            if value is None:
                continue  # an empty section in YAML keeps the defaults
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: section '{prefix}{name}' must be a mapping, got {value!r}")
            _apply_mapping(getattr(target, name), value, prefix + name + ".", origin)
        else:
            _set_field(target, name, value, prefix, origin)


def _child_section(target: Any, name: str, prefix: str, origin: str) -> Any:
    hints = typing.get_type_hints(type(target))
    if name not in hints or not dataclasses.is_dataclass(hints[name]):
        sections = [k for k, t in hints.items() if dataclasses.is_dataclass(t)]
        raise ConfigError(f"{origin}: unknown section '{prefix}{name}'{_suggest(name, sections)}")
    return getattr(target, name)


def _set_field(target: Any, name: str, value: Any, prefix: str, origin: str) -> None:
    hints = typing.get_type_hints(type(target))
    key = prefix + name
    if name not in hints:
        raise ConfigError(f"{origin}: unknown key '{key}'{_suggest(name, list(hints), prefix)}")
    expected = hints[name]
    if dataclasses.is_dataclass(expected):
        raise ConfigError(f"{origin}: '{key}' is a section; set its keys, e.g. {key}.<name>=...")
    setattr(target, name, _coerce(value, expected, key, origin))


def _coerce(value: Any, expected: Any, key: str, origin: str) -> Any:
    """Returns `value` as type `expected` or raises ConfigError; see the module docstring."""
    args = typing.get_args(expected)
    is_optional = typing.get_origin(expected) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if is_optional else expected
    # "none" reads as null, except for a key where "none" is itself a choice (offload.activations=none).
    nulls = ("null",) if key in NONE_IS_A_CHOICE else ("null", "none")
    if value is None or (is_optional and isinstance(value, str) and value.lower() in nulls):
        if is_optional:
            return None
        raise ConfigError(f"{origin}: '{key}' cannot be null; expected {base.__name__}")
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        # Paths and names like "13b" or "1.3" are strings even when YAML reads them as numbers.
        return str(value)
    raise ConfigError(f"{origin}: '{key}' expects {base.__name__}{' or null' if is_optional else ''}, got {value!r}")


def _suggest(name: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; known: {', '.join(prefix + k for k in known)}"
