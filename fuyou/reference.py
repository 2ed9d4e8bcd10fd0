"""The reference trainer: plain PyTorch on one device, the oracle every runtime is checked against.

It shares the model and the data code with the Fuyou runtime and nothing else (but, with
`compile_blocks`, the compile wrapper of fuyou.block_compile), so that a parity failure points at the runtime. It is kept obviously correct rather than fast:

- loss: cross-entropy summed over every target token of the optimizer step (all micro-batches),
  divided by the number of those tokens. Each micro-batch back-propagates its own sum divided by
  the step's total, so gradient accumulation gives exactly the gradient of one large batch even
  when micro-batches hold different numbers of target tokens.
- gradient clipping by the global L2 norm over all parameters (torch's clip_grad_norm_). With a fused torch
  AdamW (CUDA) the clip factor goes to the optimizer kernel as its `grad_scale` (the hook GradScaler uses to
  unscale), which divides each gradient as it reads it: the same update, without clip_grad_norm_'s separate
  pass that multiplies every gradient in place (3.9 ms of a 1.3B step, `benchmarks.diag.halo_step`).
- torch.optim.AdamW, decoupled weight decay on matrices (2-D and up) only; biases, norms and
  nothing else are exempt. Learning rate from `fuyou.lr_schedule` at every step. On CUDA its fused
  kernel (`fused=True`, the same update in one pass over each tensor chunk): torch's default there,
  foreach, makes several passes, and took 44.5 of a 187 ms GPT-3 1.3B step on the H100 against 20.0
  fused (`benchmarks.diag.halo_step`). The CPU keeps the default, so the CPU parity tests still check
  the runtime's fused CPU kernel against an independent implementation.
- bf16: autocast around forward and loss; master weights, gradients and Adam state stay fp32.
- activation checkpointing: each block is recomputed in backward (torch.utils.checkpoint).
- compile (opt-in): every block through one torch.compile'd function (fuyou.block_compile), the
  checkpointing inside it, and the head with the loss through a second one, where Inductor fuses the fp32
  upcast, log-softmax and their backward into passes over the bf16 logits (eager, the fp32 copy of the
  [B, S, V] logits, its softmax and gradient cost 13 ms of a 1.3B step at batch 8, `benchmarks.diag.halo_step`).
  The model code is the same, only its kernels are fused.

Shapes: B batch, S sequence, V vocabulary, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fuyou.block_compile import CompiledBlock, module_block_function
from fuyou.data import IGNORE_INDEX, Batch
from fuyou.lr_schedule import lr_at_step


@dataclass
class StepResult:
    """What one optimizer step did.

    Attributes:
        loss: mean cross-entropy per target token over the whole step (all micro-batches).
        grad_norm: global L2 norm of the gradient before clipping.
        lr: learning rate applied at this step.
        num_tokens: input tokens processed (batch x sequence x micro-batches).
        num_target_tokens: tokens that carried loss.
    """

    loss: float
    grad_norm: float
    lr: float
    num_tokens: int
    num_target_tokens: int


def causal_lm_loss_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies in fp32, skipping labels equal to IGNORE_INDEX."""
    return F.cross_entropy(
        logits_BSV.float().reshape(-1, logits_BSV.shape[-1]),
        labels_BS.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and vectors such as biases and norm scales (not decayed)."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    exempt = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def head_loss_sum(model: torch.nn.Module, x_BSD: torch.Tensor, labels_BS: torch.Tensor, bf16: bool) -> torch.Tensor:
    """causal_lm_loss_sum of the model's head on the last block's output, the head under bf16 autocast if
    `bf16` (as `ReferenceTrainer.forward` runs it); the function `train.compile` compiles."""
    with torch.autocast(x_BSD.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits_BSV = model.head(x_BSD)
    return causal_lm_loss_sum(logits_BSV, labels_BS)


def _folds_clip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` takes a `grad_scale` to divide gradients by: torch's fused Adam and AdamW
    (`_step_supports_amp_scaling`), and no GradScaler using that hook already."""
    return (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))
            and getattr(optimizer, "_step_supports_amp_scaling", False) and getattr(optimizer, "grad_scale", None) is None)


def optimizer_step(parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None,
                   lr: float, loss_sum: torch.Tensor, micro_batches: Sequence[Batch]) -> StepResult:
    """The end of a step whose gradients are accumulated in `.grad`: clip by global norm (none when
    `max_grad_norm` is None), set `lr`, step, clear the gradients; the step's `StepResult` (loss per
    target token from `loss_sum`, the unclipped norm). Shared by every trainer that keeps `.grad`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if _folds_clip(optimizer):
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        if max_grad_norm is not None:
            # clip_grad_norm_'s factor min(1, max / (norm + 1e-6)), as its reciprocal: the kernel divides by it.
            clip = torch.clamp(max_grad_norm / (grad_norm + 1e-6), max=1.0)
            optimizer.grad_scale = clip.reciprocal()
        try:
            optimizer.step()
        finally:
            optimizer.grad_scale = None
    else:
        clip_to = max_grad_norm if max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_to)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    num_target_tokens = sum(batch.num_target_tokens for batch in micro_batches)
    return StepResult(
        loss=(loss_sum / max(1, num_target_tokens)).item(),
        grad_norm=grad_norm.item(),
        lr=lr,
        num_tokens=sum(batch.input_ids.numel() for batch in micro_batches),
        num_target_tokens=num_target_tokens,
    )


class ReferenceTrainer:
    """Trains `model` in place on the device its parameters live on.

    Args:
        model: a `fuyou.models.Transformer` (embed / blocks / head) with fp32 parameters.
        lr, warmup_steps, total_steps, min_lr_ratio: the schedule (see fuyou.lr_schedule).
        weight_decay, betas, eps: AdamW.
        max_grad_norm: clip threshold, or None for no clipping (the norm is still reported).
        precision: "fp32" or "bf16" (autocast; fp32 master weights).
        activation_checkpointing: recompute each block in backward instead of keeping its
            activations.
        optimizer: use this optimizer (e.g. QLoRA's paged AdamW) instead of torch's AdamW; the
            schedule still sets each group's "lr" every step.
        compile_blocks: run each block (and its checkpointing) through one torch.compile'd function.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        max_grad_norm: float | None = None,
        precision: str = "fp32",
        activation_checkpointing: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        compile_blocks: bool = False,
    ):
        assert precision in ("fp32", "bf16"), precision
        self.model = model
        self.device = next(model.parameters()).device
        self.schedule = dict(peak_lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
        self.max_grad_norm = max_grad_norm
        self.precision = precision
        self.activation_checkpointing = activation_checkpointing
        self.optimizer = optimizer or torch.optim.AdamW(adamw_param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                                                        fused=self.device.type == "cuda" or None)
        self.step_index = 0
        self.compiled_block = module_block_function() if compile_blocks else None
        self.compiled_head_loss = CompiledBlock(head_loss_sum) if compile_blocks else None

    def forward(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] under this trainer's precision and checkpointing settings."""
        x_BSD = self.hidden(input_ids_BS)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model.head(x_BSD)

    def hidden(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, S, D] (the head's input), under the same settings as `forward`."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            x_BSD = self.model.embed(input_ids_BS)
            for block in self.model.blocks:
                checkpointed = self.activation_checkpointing and torch.is_grad_enabled()
                if self.compiled_block is not None:
                    x_BSD = self.compiled_block(block, x_BSD, checkpointed)
                elif checkpointed:
                    x_BSD = checkpoint(block, x_BSD, use_reentrant=False)
                else:
                    x_BSD = block(x_BSD)
            return x_BSD

    def step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """One optimizer step over `micro_batches` (gradient accumulation = len(micro_batches))."""
        self.model.train()
        num_target_tokens = sum(batch.num_target_tokens for batch in micro_batches)
        # A step whose micro-batches hold no target at all (possible with prompt-only data) must not
        # divide by zero; its gradient is zero and AdamW still applies weight decay.
        denominator = max(1, num_target_tokens)
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            input_ids = batch.input_ids.to(self.device, non_blocking=True)
            labels = batch.labels.to(self.device, non_blocking=True)
            if self.compiled_head_loss is not None:
                micro_loss_sum = self.compiled_head_loss(self.model, self.hidden(input_ids), labels, self.precision == "bf16")
            else:
                micro_loss_sum = causal_lm_loss_sum(self.forward(input_ids), labels)
            (micro_loss_sum / denominator).backward()
            loss_sum += micro_loss_sum.detach()

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        result = optimizer_step(trainable, self.optimizer, max_grad_norm=self.max_grad_norm,
                                lr=lr_at_step(self.step_index, **self.schedule), loss_sum=loss_sum,
                                micro_batches=micro_batches)
        self.step_index += 1
        return result
