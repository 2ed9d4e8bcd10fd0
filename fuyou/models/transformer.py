"""Decoder-only transformer in two layouts: GPT-2/GPT-3 ("gpt") and LLaMA ("llama").

The model is plain PyTorch and knows nothing of offload, devices or training: the runtime streams each
`Block`'s parameters on its own and recomputes blocks one at a time, so `Block.forward(x_BSD)` is a pure
function of `x_BSD` (positions come from S inside; nothing is carried from block to block).

`Block.forward(x_BSD, output_unused=True)` is for a recompute whose caller only backpropagates through
the result and never reads it: the block's last linear (the MLP's down projection, whose output feeds
nothing but the residual add) then skips its forward GEMM, and the returned values are undefined. Its
backward needs the linear's input and weight, never its output, so gradients are unchanged; the recompute
saves 2·T·F·D of its ~2·T·(4D² + 2FD) + attention FLOPs (GPT-3 2.7B: 29%). Megatron-style checkpointing
and torch.utils.checkpoint recompute it anyway.

Parameter names, per block `blocks.{j}.`:
    attn_norm.{weight,bias}   attn.qkv_proj.{weight,bias}   attn.o_proj.{weight,bias}
    mlp_norm.{weight,bias}    mlp.up_proj / mlp.gate_up_proj   mlp.down_proj
plus `token_embedding.weight`, `position_embedding.weight` (gpt), `final_norm.*`, `lm_head.weight` (untied).
q/k/v (and LLaMA's gate/up) are fused so that a block is few, large tensors to move; `fuyou.models.hf`
splits them back into Hugging Face names.

Shape legend:
    B batch, S sequence (positions), D hidden size, H query heads, K key/value heads, E head dim,
    F feed-forward (intermediate) size, V vocabulary size, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fuyou.errors import ModelError

FAMILIES = ("gpt", "llama")
INIT_STD = 0.02  # GPT-2 / HF `initializer_range`
HEAD_VOCAB_ALIGN = 64  # rows the LM head GEMM is padded to on CUDA (Transformer.head): 128-byte bf16 rows
LAST_LINEAR = "mlp.down_proj"  # a block's last linear: its output feeds nothing but the residual add


@dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a decoder-only transformer.

    Attributes:
        family: "gpt" (LayerNorm, GELU(tanh) MLP, learned positions, biases everywhere) or "llama"
            (RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases but optional q/k/v bias).
        vocab_size: V, rows of the token embedding.
        hidden_size: D.
        num_layers: L, number of blocks.
        num_heads: H, query heads.
        num_kv_heads: K, key/value heads; None means H (no grouping). "gpt" requires K == H.
        intermediate_size: F; None means 4*D for "gpt" and LLaMA's rule 256*ceil(8D/3/256) for "llama".
        max_seq_len: longest sequence `embed` accepts (rows of the position table for "gpt").
        norm_eps: epsilon of LayerNorm / RMSNorm.
        rope_theta: rotary base ("llama" only).
        qkv_bias: biases on q/k/v projections ("llama" only, Qwen2 sets it; "gpt" always has biases).
        tie_embeddings: the LM head reuses the token embedding matrix.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelError(f"unknown model family {self.family!r}; use one of {', '.join(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ModelError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("num_kv_heads", "intermediate_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ModelError(f"{name} must be a positive integer or None, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ModelError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick num_heads that divides hidden_size"
            )
        if self.num_heads % self.kv_heads:
            raise ModelError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}; "
                "pick num_kv_heads that divides num_heads"
            )
        if self.family == "gpt" and self.kv_heads != self.num_heads:
            raise ModelError(
                f"family 'gpt' has no grouped-query attention: set num_kv_heads=None (got {self.num_kv_heads})"
            )
        if self.family == "llama" and self.head_dim % 2:
            raise ModelError(f"rotary embeddings need an even head_dim, got {self.head_dim}; change num_heads")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ModelError(f"norm_eps and rope_theta must be > 0, got {self.norm_eps} and {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        """E = D / H."""
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """K, with None resolved to H."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def ffn_size(self) -> int:
        """F, with None resolved per family."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.family == "gpt":
            return 4 * self.hidden_size
        # LLaMA paper: 2/3 of 4D, rounded up to a multiple of 256.
        return 256 * math.ceil(8 * self.hidden_size / 3 / 256)

    @property
    def has_qkv_bias(self) -> bool:
        """Whether the fused q/k/v projection has a bias (always for "gpt")."""
        return self.family == "gpt" or self.qkv_bias

    def num_block_parameters(self) -> int:
        """Parameters of one `Block`."""
        D, E, H, K, F_ = self.hidden_size, self.head_dim, self.num_heads, self.kv_heads, self.ffn_size
        is_gpt = self.family == "gpt"
        qkv = D * (H + 2 * K) * E + ((H + 2 * K) * E if self.has_qkv_bias else 0)
        out = H * E * D + (D if is_gpt else 0)
        mlp = (2 * D * F_ + F_ + D) if is_gpt else 3 * D * F_
        norms = 2 * (2 * D if is_gpt else D)
        return qkv + out + mlp + norms

    def num_parameters(self) -> int:
        """Analytic parameter count; equals `build_model(self).num_parameters()` (tied weights once)."""
        D, V = self.hidden_size, self.vocab_size
        embeddings = V * D + (self.max_seq_len * D if self.family == "gpt" else 0)
        final_norm = 2 * D if self.family == "gpt" else D
        lm_head = 0 if self.tie_embeddings else V * D
        return embeddings + self.num_layers * self.num_block_parameters() + final_norm + lm_head

    def replace(self, **changes) -> TransformerConfig:
        """A copy with `changes` applied and validated.

        Raises:
            ModelError: a key is not a field, or the result is invalid.
        """
        fields = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ModelError(f"unknown TransformerConfig field(s) {unknown}; known fields: {sorted(fields)}")
        return dataclasses.replace(self, **changes)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as HF Llama does, so bf16 results match it."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x32_BSD = x_BSD.float()
        x32_BSD = x32_BSD * torch.rsqrt(x32_BSD.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32_BSD.to(x_BSD.dtype)


def make_norm(config: TransformerConfig) -> nn.Module:
    """LayerNorm (with bias) for "gpt", RMSNorm for "llama"."""
    if config.family == "gpt":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, eps=config.norm_eps)


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SE and sin_SE for rotary embeddings in the "rotate half" layout HF Llama checkpoints use.

    Computed in fp32 (as HF does) and cast to `dtype`; cheap next to attention, and recomputing it keeps
    each block free of position state.
    """
    inv_freq_E2 = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions_S = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles_SE2 = positions_S[:, None] * inv_freq_E2[None, :]
    angles_SE = torch.cat((angles_SE2, angles_SE2), dim=-1)
    return angles_SE.cos().to(dtype), angles_SE.sin().to(dtype)


def apply_rotary(x_BNSE: torch.Tensor, cos_SE: torch.Tensor, sin_SE: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (i, i + E/2) of every head of `x_BNSE` (N = H or K) by its position's angle."""
    first_BNSE2, second_BNSE2 = x_BNSE.chunk(2, dim=-1)
    rotated_half_BNSE = torch.cat((-second_BNSE2, first_BNSE2), dim=-1)
    return x_BNSE * cos_SE + rotated_half_BNSE * sin_SE


def _split_linear(linear: nn.Module, x_BSI: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """linear(x).split(sizes, -1); a linear with its own `forward_split` (HALO's FP8 linear, which then reads
    the blocks' gradients in place rather than concatenated) runs that."""
    split = getattr(linear, "forward_split", None)
    return split(x_BSI, sizes) if split is not None else linear(x_BSI).split(sizes, dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention with grouped K/V heads and, for "llama", rotary positions."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        self.rope_theta = config.rope_theta if config.family == "llama" else None
        qkv_size = (self.num_heads + 2 * self.kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=config.has_qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.family == "gpt")

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, K, E = self.num_heads, self.kv_heads, self.head_dim
        q_BSX, k_BSX, v_BSX = _split_linear(self.qkv_proj, x_BSD, (H * E, K * E, K * E))
        q_BHSE = q_BSX.view(B, S, H, E).transpose(1, 2)
        k_BKSE = k_BSX.view(B, S, K, E).transpose(1, 2)
        v_BKSE = v_BSX.view(B, S, K, E).transpose(1, 2)
        if self.rope_theta is not None:
            cos_SE, sin_SE = rotary_cos_sin(S, E, self.rope_theta, x_BSD.device, q_BHSE.dtype)
            q_BHSE = apply_rotary(q_BHSE, cos_SE, sin_SE)
            k_BKSE = apply_rotary(k_BKSE, cos_SE, sin_SE)
        # enable_gqa lets SDPA share each K/V head across H/K query heads without materialising copies.
        out_BHSE = F.scaled_dot_product_attention(q_BHSE, k_BKSE, v_BKSE, is_causal=True, enable_gqa=K != H)
        return self.o_proj(out_BHSE.transpose(1, 2).reshape(B, S, H * E))


class _LinearBackwardOnly(torch.autograd.Function):
    """F.linear(x, W, b) for autograd only: forward allocates the output (its shape and dtype) without the
    GEMM; backward is linear's own, dx = dy·W, dW = dyᵀ·x, db = Σ dy, in the dtype F.linear would have run in
    (autocast's, else the inputs'), each gradient returned in its input's dtype as autocast's casts do."""

    @staticmethod
    def forward(ctx, x_BSI: torch.Tensor, weight_OI: torch.Tensor, bias_O: torch.Tensor | None) -> torch.Tensor:
        device_type = x_BSI.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = torch.promote_types(x_BSI.dtype, weight_OI.dtype)
        ctx.save_for_backward(x_BSI, weight_OI, bias_O)
        ctx.dtype = dtype
        return x_BSI.new_empty((*x_BSI.shape[:-1], weight_OI.shape[0]), dtype=dtype)

    @staticmethod
    def backward(ctx, grad_BSO: torch.Tensor):
        x_BSI, weight_OI, bias_O = ctx.saved_tensors
        dtype = ctx.dtype
        grad_TO = grad_BSO.reshape(-1, grad_BSO.shape[-1]).to(dtype)
        x_TI = x_BSI.reshape(-1, x_BSI.shape[-1]).to(dtype)
        grad_x = (grad_TO @ weight_OI.to(dtype)).view(*x_BSI.shape).to(x_BSI.dtype)
        grad_weight = (grad_TO.t() @ x_TI).to(weight_OI.dtype)
        grad_bias = None if bias_O is None else grad_TO.sum(0).to(bias_O.dtype)
        return grad_x, grad_weight, grad_bias


def _last_linear(linear: nn.Module, x_BSF: torch.Tensor, output_unused: bool) -> torch.Tensor:
    """The block's last linear; under `output_unused`, a plain nn.Linear skips its forward GEMM (module
    docstring). Subclasses (HALO's FP8 linear) and wrappers run as they are."""
    if output_unused and type(linear) is nn.Linear:
        return _LinearBackwardOnly.apply(x_BSF, linear.weight, linear.bias)
    return linear(x_BSF)


class GeluMlp(nn.Module):
    """GPT-2 MLP: up (D->F), GELU with the tanh approximation ("gelu_new"), down (F->D), with biases."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.ffn_size)
        self.down_proj = nn.Linear(config.ffn_size, config.hidden_size)

    def forward(self, x_BSD: torch.Tensor, output_unused: bool = False) -> torch.Tensor:
        # A down-projection that can run the whole MLP with the GELU inside its FP8 casts (HALO's linear with
        # delayed scaling, quant.halo_mlp) does; it returns None where it cannot.
        fused = getattr(self.down_proj, "forward_gelu_mlp", None)
        if fused is not None and not output_unused:
            y_BSD = fused(self.up_proj, x_BSD)
            if y_BSD is not None:
                return y_BSD
        return _last_linear(self.down_proj, F.gelu(self.up_proj(x_BSD), approximate="tanh"), output_unused)


class SwiGluMlp(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x)); gate and up are one fused D->2F projection, no biases."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.ffn_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_size, config.hidden_size, bias=False)

    def forward(self, x_BSD: torch.Tensor, output_unused: bool = False) -> torch.Tensor:
        gate_BSF, up_BSF = self.gate_up_proj(x_BSD).chunk(2, dim=-1)
        return _last_linear(self.down_proj, F.silu(gate_BSF) * up_BSF, output_unused)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). Pure in x_BSD."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = GeluMlp(config) if config.family == "gpt" else SwiGluMlp(config)

    def forward(self, x_BSD: torch.Tensor, output_unused: bool = False) -> torch.Tensor:
        """y_BSD; with `output_unused` (module docstring) only its gradients are defined, not its values."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return x_BSD + self.mlp(self.mlp_norm(x_BSD), output_unused)


class Transformer(nn.Module):
    """Embedding, `blocks`, final norm and LM head. Build it with `build_model`.

    The offload runtime drives the three stages itself: `embed`, each of `blocks`, then `head`. With tied
    embeddings there is no `lm_head` module (`lm_head is None`): `head` reads `token_embedding.weight`, so
    that matrix is used at both ends of the model and appears once in `parameters()`.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = (
            nn.Embedding(config.max_seq_len, config.hidden_size) if config.family == "gpt" else None
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """Token embeddings (plus learned positions for "gpt").

        Args:
            input_ids_BS: int64 token ids, on the embedding's device.

        Returns:
            x_BSD in the parameters' dtype.

        Raises:
            ModelError: S exceeds `config.max_seq_len`.
        """
        seq_len = input_ids_BS.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ModelError(
                f"sequence length {seq_len} exceeds the model's max_seq_len {self.config.max_seq_len}; "
                "use shorter sequences"
            )
        x_BSD = self.token_embedding(input_ids_BS)
        if self.position_embedding is not None:
            x_BSD = x_BSD + self.position_embedding(torch.arange(seq_len, device=input_ids_BS.device))
        return x_BSD

    def head(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: x_BSD -> logits_BSV (in the parameters' dtype).

        On CUDA a vocabulary that is not a multiple of `HEAD_VOCAB_ALIGN` (GPT-2's 50257) is padded with
        zero rows for the GEMM and the logits are a view of the first V columns: with an odd leading
        dimension cuBLAS can only pick pre-Hopper kernels (measured on the H100: the 2.7B head and loss
        over 32 x 2048 tokens took 485 ms, 81% of it in `cutlass_75` GEMMs at ~130 TFLOPS). The padded
        rows' logits are never read, so their gradient is zero and values and gradients are unchanged.
        Megatron pads its vocabulary for the same reason, but in the checkpoint; this keeps V as it is.
        """
        weight_VD = self.token_embedding.weight if self.lm_head is None else self.lm_head.weight
        vocab_size = weight_VD.shape[0]
        pad = -vocab_size % HEAD_VOCAB_ALIGN
        if pad == 0 or not weight_VD.is_cuda:
            return F.linear(self.final_norm(x_BSD), weight_VD)
        return F.linear(self.final_norm(x_BSD), F.pad(weight_VD, (0, 0, 0, pad)))[..., :vocab_size]

    def forward(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """logits_BSV = head(blocks(embed(input_ids_BS)))."""
        x_BSD = self.embed(input_ids_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD)
        return self.head(x_BSD)

    def num_parameters(self) -> int:
        """Number of parameter elements, tied weights counted once."""
        return sum(parameter.numel() for parameter in self.parameters())


class Initializer:
    """GPT-2 / HF initialisation, drawn one piece of a model at a time: N(0, 0.02) weights, zero biases, unit norms.

    Residual output projections (`o_proj`, `down_proj`) use std 0.02/sqrt(2L), GPT-2's scaling for the
    2L residual branches. Values are drawn on the CPU in fp32 and then copied, so a seed gives the same
    weights on every device and (up to rounding) in every dtype.

    One generator serves the whole model and each call draws for its module's submodules in
    `modules()` order, so initialising the `pieces()` in their order -- the embeddings, block 0, 1, ...,
    then the final norm and head -- gives bit for bit what one pass over the whole model gives. That is
    what lets the offload runtime materialise a large model one block at a time (fuyou.runtime) instead
    of first building all of it in fp32 (41 GB at 10B parameters).

    Args:
        model: the model to initialise (materialised, or on "meta" until each piece is materialised).
        seed: seeds a private generator; None draws from torch's global CPU RNG.
    """

    def __init__(self, model: Transformer, *, seed: int | None = None) -> None:
        self.model = model
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.residual_std = INIT_STD / math.sqrt(2 * model.config.num_layers)
        self.residual_projections = {id(block.attn.o_proj) for block in model.blocks}
        self.residual_projections |= {id(block.mlp.down_proj) for block in model.blocks}

    def pieces(self) -> list[nn.Module]:
        """The model's top-level modules with `blocks` split into its blocks, in initialisation order."""
        pieces = []
        for child in self.model.children():
            pieces.extend(child if child is self.model.blocks else [child])
        return pieces

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> None:
        """Initialise `module` (materialised) in place, drawing the generator's next values."""
        for submodule in module.modules():
            if isinstance(submodule, (nn.LayerNorm, RMSNorm)):
                submodule.weight.fill_(1.0)
                if getattr(submodule, "bias", None) is not None:
                    submodule.bias.zero_()
            elif isinstance(submodule, (nn.Linear, nn.Embedding)):
                std = self.residual_std if id(submodule) in self.residual_projections else INIT_STD
                values = torch.empty(submodule.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=self.generator)
                submodule.weight.copy_(values)
                if getattr(submodule, "bias", None) is not None:
                    submodule.bias.zero_()

    def materialize(self, module: nn.Module, device: str | torch.device = "cpu") -> None:
        """Allocate `module` (one of `pieces()`, on "meta") on `device` and initialise it."""
        module.to_empty(device=device)
        self(module)


def init_parameters(model: Transformer, *, seed: int | None = None) -> None:
    """Initialise a materialised (not meta) model in place; see `Initializer` for the scheme and seeding."""
    initialize = Initializer(model, seed=seed)
    for piece in initialize.pieces():
        initialize(piece)


def build_model(
    config: TransformerConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> Transformer:
    """Build and initialise a model directly on `device` in `dtype`.

    The modules are first created on the meta device, so nothing is allocated twice and `device="meta"`
    describes even a 175B model for free (shapes only, no initialisation).

    Args:
        config: the model's shape.
        device: where the parameters live; "meta" skips allocation and initialisation.
        dtype: parameter dtype.
        seed: makes initialisation deterministic; None uses torch's global RNG (see `init_parameters`).

    Returns:
        The model, with `requires_grad=True` parameters.
    """
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    if torch.device(device).type == "meta":
        return model
    model = model.to_empty(device=device)
    init_parameters(model, seed=seed)
    return model
