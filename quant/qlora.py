"""QLoRA on our Transformer: frozen NF4 base (bitsandbytes), LoRA adapters (peft), paged AdamW, HF/PEFT export.

After Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023). Nothing numerical is
re-implemented here: NF4 with double quantization is `bitsandbytes.nn.Linear4bit(quant_type="nf4",
compress_statistics=True)`, LoRA is `peft.get_peft_model`, the optimizer is `bitsandbytes.optim.PagedAdamW` (stepped
with one device sync rather than one per parameter: `PagedAdamW` here).
This module wires them to our model and translates the result to Hugging Face names.

Adapters in PEFT's format. Our attention has one fused projection W_qkv [(H + 2K) E, D] where HF has
q_proj, k_proj, v_proj (and LLaMA's fused gate_up where HF has gate_proj, up_proj). LoRA on the fused
layer adds scaling * B A x with A [r, D] and B [(H + 2K) E, r]; row block i of that is scaling * B_i A x,
which is exactly a LoRA on projection i with the same A, the row block B_i of B, and the same rank and
scaling. So the split is exact, and `save_adapters` writes what `peft.PeftModel.from_pretrained` loads
onto `LlamaForCausalLM` / `Qwen2ForCausalLM` / `GPT2LMHeadModel` built from `config_to_hf`. (Only
training-time dropout differs: the fused layer draws one dropout mask for q, k and v; HF would draw three.)
The row blocks come from the same `Rule`s `fuyou.models.hf` uses for the weights, so both cannot drift.

Legend: D hidden, I/O a linear layer's input/output features, r LoRA rank, E head dim, H/K query/kv heads.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import bitsandbytes as bnb
import peft
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from fuyou.models import Transformer, build_model, save_pretrained
from fuyou.models.hf import state_dict_rules
from fuyou.reference import adamw_param_groups

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_BITS = (8, 32)
NF4_BLOCK_SIZE = 64  # Linear4bit's default: one absmax per 64 weights


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the tensor-core dtype QLoRA uses), fp32 elsewhere (bf16 matmuls on CPU are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@functools.cache
def cpu_dequantize_garbles_ragged_rows() -> bool:
    """Whether this bitsandbytes' CPU `dequantize_4bit` misplaces block scales for rows of a length that is
    not a multiple of the 64-element block (0.50.2 does: ~25% weight error instead of NF4's ~9%).

    Quantization is flat over the tensor, but the CPU kernel dequantizes row by row; both the forward
    (matmul_4bit) and our export dequantize the same way, so they agree with each other, yet the model is
    noisier than NF4 should make it. The CUDA kernel is flat and unaffected. Probed, not version-matched,
    so a fixed bitsandbytes silences the warning by itself.
    """
    weight = torch.linspace(-1.0, 1.0, 2 * 96).reshape(2, 96)
    packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([weight.numel()])
    return not torch.equal(dequantize_4bit(packed, state).flatten(), dequantize_4bit(packed, flat_state))


def quantize_linears_nf4(model: nn.Module, *, compute_dtype: torch.dtype,
                         exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every plain nn.Linear of `model` (but `exclude`d names) by a frozen NF4 Linear4bit, in place.

    Each weight is quantized where it lives (bitsandbytes quantizes when a Params4bit is moved to its
    device): NF4 codes in blocks of 64 with double-quantized absmax statistics. Biases stay as they were,
    frozen. The LM head stays unquantized, as in QLoRA.

    Args:
        model: e.g. a `fuyou.models.Transformer`, materialised on CPU or CUDA.
        compute_dtype: dtype the dequantized weight is multiplied in (bf16 on GPU, fp32 on CPU).
        exclude: last components of module names to leave alone.

    Returns:
        The qualified names of the quantized modules.
    """
    quantized = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in exclude:
            continue
        device = module.weight.device
        if device.type == "cpu" and module.in_features % NF4_BLOCK_SIZE and cpu_dequantize_garbles_ragged_rows():
            warnings.warn(
                f"{name}: in_features {module.in_features} is not a multiple of {NF4_BLOCK_SIZE}, and this "
                "bitsandbytes' CPU dequantization misplaces NF4 block scales for such rows (about 25% weight "
                "error instead of 9%); train on CUDA or pick sizes that are multiples of 64",
                stacklevel=2,
            )
        with torch.device("meta"):
            nf4 = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        # Quantized from the compute dtype, as from a bf16 checkpoint: the QuantState records the source
        # dtype and bitsandbytes dequantizes to it, so an fp32 source would make every backward dequantize
        # to fp32 and cast to bf16 (measured on the 8B shape: 0.04 s of a 0.45 s step).
        nf4.weight = bnb.nn.Params4bit(module.weight.data.to(compute_dtype), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", module=nf4).to(device)
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place on the first no-grad eval
        # forward and then multiplies in bf16: the CPU would stop computing in `compute_dtype`, and the
        # repacked layout is no longer what `dequantize_4bit` (our export) reads. Keep the portable path.
        nf4.support_avx512bf16_for_cpu = False
        if module.bias is not None:
            nf4.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, nf4)
        quantized.append(name)
    return quantized


def prepare_qlora(model: Transformer, *, rank: int = 16, alpha: float = 32.0, dropout: float = 0.05,
                  target_modules: list[str] | None = None,
                  compute_dtype: torch.dtype | None = None) -> peft.PeftModel:
    """Freeze `model`, quantize its block linears to NF4, and put trainable LoRA adapters on the targets.

    The result is a `peft.PeftModel` around `model` (changed in place); its attribute lookups reach our
    Transformer, so `embed`, `blocks` and `head` work as before and the reference trainer can drive it.
    (`quant.qlora_stream.build_streamed_qlora` does the same one block at a time, into CPU memory.)

    Args:
        model: our Transformer, materialised (fp32 on CPU; any dtype on CUDA).
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is (alpha / r) B A x.
        dropout: dropout on the LoRA branch's input while training.
        target_modules: our module names to adapt, e.g. ["qkv_proj", "o_proj"]; None means every linear
            layer but the head (qkv_proj, o_proj, gate_up_proj / up_proj, down_proj).
        compute_dtype: NF4 compute dtype; None picks `default_compute_dtype` for the model's device.

    Returns:
        The PEFT model; only LoRA A/B matrices require grad.

    Raises:
        ValueError: a rank below 1, or a target that names no linear layer of the model.
    """
    if rank < 1:  # before the quantization, which is the slow part
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    device = next(model.parameters()).device
    model.requires_grad_(False)
    quantized = quantize_linears_nf4(model, compute_dtype=compute_dtype or default_compute_dtype(device))
    return add_lora(model, quantized, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)


def check_lora_settings(linear_names: list[str], *, rank: int, target_modules: list[str] | None) -> list[str]:
    """The LoRA targets (last name components) among `linear_names`: all of them, or `target_modules`.

    Raises:
        ValueError: a rank below 1, or a target that names none of `linear_names`.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    available = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    targets = available if target_modules is None else list(target_modules)
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise ValueError(f"LoRA target_modules {unknown} name no linear layer of this model; choose from {available}")
    return targets


def add_lora(model: Transformer, quantized: list[str], *, rank: int, alpha: float, dropout: float,
             target_modules: list[str] | None) -> peft.PeftModel:
    """peft LoRA adapters on the `target_modules` among the `quantized` linears (None: all of them)."""
    targets = check_lora_settings(quantized, rank=rank, target_modules=target_modules)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return peft.get_peft_model(model, config)


def make_paged_adamw(model: nn.Module, *, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                     weight_decay: float = 0.0, optim_bits: int = 8) -> torch.optim.Optimizer:
    """bitsandbytes' paged AdamW over the trainable parameters, grouped like the reference trainer's AdamW.

    Paged: optimizer state sits in CUDA unified memory and is evicted to CPU under memory pressure
    (falls back to ordinary tensors off CUDA). 8-bit keeps blockwise-quantized Adam moments for tensors
    of at least 4096 elements (bitsandbytes' min_8bit_size); smaller ones stay 32-bit.

    Raises:
        ValueError: optim_bits other than 8 or 32.
    """
    if optim_bits not in OPTIMIZER_BITS:
        raise ValueError(f"optim_bits must be one of {OPTIMIZER_BITS}, got {optim_bits}")
    groups = [group for group in adamw_param_groups(model, weight_decay) if group["params"]]
    return PagedAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=optim_bits)


class PagedAdamW(bnb.optim.PagedAdamW):
    """bitsandbytes' paged AdamW, stepping with one device synchronisation instead of one per parameter.

    bitsandbytes 0.50's `Optimizer8bit.step` calls `torch.cuda.synchronize()` after every parameter's
    update. Its kernels are launched without a stream, so on the legacy default stream, and the sync
    keeps them ordered against work a caller queued on other streams (bitsandbytes PR #2050 discusses
    it). For LoRA's many small tensors that drains the GPU hundreds of times a step: measured on the H100,
    LLaMA-3 8B streamed, batch 2, 256 adapter tensors: 25-35 ms of GPU idle in a profiled 0.5 s step,
    charged to the optimizer's launches (benchmarks/diag/qlora_gaps.py).

    When the caller computes on that same default stream (ours does), the gradients' producers, the
    paged-state prefetches (`cudaMemPrefetchAsync` on stream 0) and the update kernels are already in
    stream order, so the per-parameter syncs add nothing: this `step` runs bitsandbytes' own per-parameter
    calls (`init_state`, `prefetch_state`, `update_step`) in its order, and synchronises once at the end,
    as bitsandbytes does for paged state. The kernels and their order are unchanged, so the results are
    bitwise those of bitsandbytes' step. On any other stream, or with a closure, bitsandbytes' step runs.
    """

    @torch.no_grad()
    def step(self, closure=None):
        parameters = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = parameters[0].device if parameters else None
        if closure is not None or (device is not None and device.type == "cuda"
                                   and torch.cuda.current_stream(device) != torch.cuda.default_stream(device)):
            return super().step(closure)
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return None


def _lora_layers(model: peft.PeftModel) -> dict[str, BaseTunerLayer]:
    """Our module name (e.g. "blocks.0.attn.qkv_proj") -> its LoRA layer."""
    base = model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)}


def _single_adapter(model: peft.PeftModel) -> str:
    active = model.active_adapters
    if len(active) != 1:
        raise ValueError(f"export needs exactly one active adapter, found {active}; call set_adapter first")
    return active[0]


def adapter_state_dict_hf(model: peft.PeftModel) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The active adapter's LoRA weights under the HF model's PEFT names, fused layers split.

    Returns:
        (state dict {"base_model.model.<hf module>.lora_A.weight": A_rI, ...lora_B.weight: B_Or}, on the
        CPU, contiguous; the HF module names that carry LoRA, in order).
    """
    adapter = _single_adapter(model)
    rules = state_dict_rules(model.get_base_model().config)
    state, hf_modules = {}, []
    for ours, layer in _lora_layers(model).items():
        a_rI = layer.lora_A[adapter].weight.detach().cpu()
        b_Or = layer.lora_B[adapter].weight.detach().cpu()
        rule = rules[ours + ".weight"]
        # "concat": our rows are the HF pieces stacked (q, k, v / gate, up); "copy"/"transpose": one piece.
        # GPT-2's Conv1D stores its weight transposed, but peft keeps LoRA A [r, I] and B [O, r] for it too.
        pieces = b_Or.split(list(rule.split_sizes)) if rule.kind == "concat" else (b_Or,)
        for hf_weight, b_piece in zip(rule.hf_names, pieces, strict=True):
            hf_module = hf_weight.removesuffix(".weight")
            state[f"base_model.model.{hf_module}.lora_A.weight"] = a_rI.clone().contiguous()
            state[f"base_model.model.{hf_module}.lora_B.weight"] = b_piece.clone().contiguous()
            hf_modules.append(hf_module)
    return state, hf_modules


def save_adapters(model: peft.PeftModel, directory: str | os.PathLike, *,
                  base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors for the HF model `config_to_hf` describes.

    `peft.PeftModel.from_pretrained(hf_model, directory)` then gives the logits our model gives (see the
    module docstring for why the split of fused layers is exact).

    Args:
        model: a model from `prepare_qlora` (or any peft LoRA around our Transformer).
        directory: created if missing; the two files are overwritten.
        base_model_name_or_path: recorded in adapter_config.json for HF tooling; optional.
    """
    adapter = _single_adapter(model)
    ours = model.peft_config[adapter]
    state, hf_modules = adapter_state_dict_hf(model)
    # Targets as "parent.child" suffixes: GPT-2 has attn.c_proj and mlp.c_proj, which a bare "c_proj"
    # would not tell apart; peft matches a target against the end of each module name.
    targets = sorted({".".join(name.split(".")[-2:]) for name in hf_modules})
    hf_config = peft.LoraConfig(
        r=ours.r, lora_alpha=ours.lora_alpha, lora_dropout=ours.lora_dropout, use_rslora=ours.use_rslora,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out=model.get_base_model().config.family == "gpt",  # GPT-2's Conv1D layout, for merging
        base_model_name_or_path=base_model_name_or_path,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(directory))
    save_file(state, directory / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})


def _dense_linear(layer: nn.Module, adapter: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight_OI dequantized, bias) of a Linear4bit / nn.Linear, plus the LoRA delta if `adapter`."""
    base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
    if isinstance(base, bnb.nn.Linear4bit):
        weight_OI = dequantize_4bit(base.weight.data, base.weight.quant_state)
    else:
        weight_OI = base.weight.detach()
    if adapter is not None and isinstance(layer, BaseTunerLayer):
        # peft's own delta: scaling * B A (transposed for fan_in_fan_out layers).
        weight_OI = weight_OI + layer.get_delta_weight(adapter).to(weight_OI.dtype)
    bias = None if base.bias is None else base.bias.detach()
    return weight_OI, bias


@torch.no_grad()
def dense_model(model: peft.PeftModel, *, merge_adapters: bool = True, dtype: torch.dtype = torch.float32,
                block_scope: Callable[[int], AbstractContextManager] | None = None) -> Transformer:
    """A plain Transformer (on the CPU, in `dtype`) with the NF4 weights dequantized, LoRA merged if asked.

    With `merge_adapters=False` it is exactly the frozen base the adapters were trained against (the NF4
    values, not the pre-quantization weights), which is what an adapter export should be applied to.

    Args:
        block_scope: j -> a context during which block j's NF4 tensors are installed (a streamed model's
            `StreamedQLoRA.resident`); None: they always are.
    """
    adapter = _single_adapter(model) if merge_adapters else None
    ours = model.get_base_model()
    dense = build_model(ours.config, device="meta")
    state = {}
    with ExitStack() as scopes:
        open_block = None
        for name, _ in dense.named_parameters():  # block by block, so one block's scope is open at a time
            block = int(name.split(".")[1]) if name.startswith("blocks.") else None
            if block_scope is not None and block != open_block:
                scopes.close()
                if block is not None:
                    scopes.enter_context(block_scope(block))
                open_block = block
            module_name, _, leaf = name.rpartition(".")
            module = ours.get_submodule(module_name)
            if isinstance(module, (BaseTunerLayer, bnb.nn.Linear4bit)):
                weight_OI, bias = _dense_linear(module, adapter)
                tensor = weight_OI if leaf == "weight" else bias
            else:
                tensor = getattr(module, leaf).detach()
            state[name] = tensor.to(device="cpu", dtype=dtype).clone()
    dense.load_state_dict(state, strict=True, assign=True)
    return dense


def save_merged(model: peft.PeftModel, directory: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                block_scope: Callable[[int], AbstractContextManager] | None = None) -> None:
    """Write a full HF checkpoint (config.json + safetensors) of base + merged adapters in `dtype`.

    Loadable by `transformers.AutoModelForCausalLM.from_pretrained` and by `fuyou.models.from_pretrained`.
    It holds the whole model unquantized on the CPU while saving: for 70B shapes that is 140 GB in bf16.
    `block_scope`: as `dense_model`'s, for a streamed model.
    """
    save_pretrained(dense_model(model, merge_adapters=True, dtype=dtype, block_scope=block_scope), directory)
