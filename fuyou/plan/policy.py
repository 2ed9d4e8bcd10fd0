"""The policy: one frozen `Plan` saying where each state class lives, what is swapped and what is
recomputed, and how a step is cut into micro-batches. The cost model prices a Plan; the planner picks one.

Vocabulary (the runtime's, fuyou/runtime.py):
    params       the compute-precision copy of each block's weights that forward and backward stream:
                 "gpu" resident, "cpu" or "ssd" streamed block by block; "master" no copy: the fp32
                 masters (optimizer "cpu") streamed and cast on the GPU.
    optimizer    fp32 master weights + two AdamW moments (12 B/param); "cpu" or "ssd" (the optimizer
                 runs on the CPU, so never "gpu"). With "ssd", `optimizer_cpu_blocks` = K splits it per
                 group as the runtime does (`fuyou.runtime.Placement.optimizer_tier`): blocks 0..K-1 and
                 the outer group (embeddings, final norm, head) in CPU RAM, blocks K..L-1 on the SSD;
                 None keeps every group, the outer one too, on the SSD.
    activations  each block's checkpointed input x_j between forward and backward: "gpu" kept, "cpu"/"ssd"
                 swapped out and back, "none" only x_0 kept (every x_j recomputed from it in backward).
    outer_optimizer  the outer group's (embeddings, final norm, head; resident on the GPU) AdamW: "cpu" with
                 the blocks, or "gpu" beside its weights (moments 8 B/param on the GPU, no serial tail).
    block internals (Fuyou's finer swapping, section 4.4 of the paper; not yet in the runtime): the
                 tensors autograd saves inside a block's attention or MLP half. Swapping a half's internals
                 spares its recompute in backward. `swapped_attention_blocks`/`swapped_mlp_blocks` count the
                 blocks whose halves are swapped; 0 and 0 is the runtime's behaviour (recompute every block).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fuyou.errors import ConfigError

PARAM_TIERS = ("gpu", "cpu", "ssd", "master")
OPTIMIZER_TIERS = ("cpu", "ssd")
ACTIVATION_TIERS = ("gpu", "cpu", "ssd", "none")
INTERNAL_TIERS = ("cpu", "ssd")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Plan:
    """One way to run a training step.

    Attributes:
        params, optimizer, activations: placements (module docstring).
        micro_batch_size: sequences per forward/backward pass.
        grad_accum: micro-batches per optimizer step.
        seq_len: tokens per sequence.
        prefetch_depth: blocks whose weights are fetched ahead of compute (0: on demand).
        precision: "bf16" (blocks, activations and gradients moved in bf16) or "fp32".
        swapped_attention_blocks, swapped_mlp_blocks: blocks whose attention / MLP internals are swapped
            instead of recomputed (module docstring).
        internals_tier: where swapped internals live ("cpu" or "ssd").
        optimizer_cpu_blocks: with optimizer "ssd", K: blocks 0..K-1 and the outer group keep their
            optimizer state in CPU RAM (module docstring); None: all of it on the SSD. At most L, which
            only the cost model knows (it checks).
        outer_optimizer: where the outer group is updated, "cpu" or "gpu" (module docstring).
        recompute_last_linear: the recompute runs each block whole, its last GEMM included (torch's and
            DeepSpeed's activation checkpointing: to price other systems); False: runtime=fuyou's,
            which skips the down projection whose output backprop never reads.
    """

    params: str
    optimizer: str
    activations: str
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    prefetch_depth: int = 1
    precision: str = "bf16"
    swapped_attention_blocks: int = 0
    swapped_mlp_blocks: int = 0
    internals_tier: str = "cpu"
    optimizer_cpu_blocks: int | None = None
    recompute_last_linear: bool = False
    outer_optimizer: str = "cpu"

    def __post_init__(self) -> None:
        for key, choices in (("params", PARAM_TIERS), ("optimizer", OPTIMIZER_TIERS),
                             ("activations", ACTIVATION_TIERS), ("internals_tier", INTERNAL_TIERS),
                             ("precision", PRECISIONS), ("outer_optimizer", ("cpu", "gpu"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"plan {key} must be one of {', '.join(choices)}; got {getattr(self, key)!r}")
        for key in ("micro_batch_size", "grad_accum", "seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"plan {key} must be >= 1, got {getattr(self, key)}")
        for key in ("prefetch_depth", "swapped_attention_blocks", "swapped_mlp_blocks"):
            if getattr(self, key) < 0:
                raise ConfigError(f"plan {key} must be >= 0, got {getattr(self, key)}")
        if self.params == "master" and self.optimizer != "cpu":
            raise ConfigError(f"plan params master streams the fp32 masters from CPU RAM; it needs optimizer cpu, got {self.optimizer!r}")
        if self.activations == "none" and (self.swapped_attention_blocks or self.swapped_mlp_blocks):
            raise ConfigError("plan activations=none recomputes every block input; it cannot also swap block internals")
        if self.optimizer_cpu_blocks is not None:
            if self.optimizer != "ssd":
                raise ConfigError("plan optimizer_cpu_blocks splits the optimizer state between CPU RAM and the SSD; "
                                  f"it needs optimizer ssd, got {self.optimizer!r}")
            if self.optimizer_cpu_blocks < 0:
                raise ConfigError(f"plan optimizer_cpu_blocks must be >= 0 or None, got {self.optimizer_cpu_blocks}")

    @property
    def batch_size(self) -> int:
        """Sequences per optimizer step."""
        return self.micro_batch_size * self.grad_accum

    @property
    def micro_batch_tokens(self) -> int:
        """T = micro-batch x sequence length: tokens per forward/backward pass."""
        return self.micro_batch_size * self.seq_len

    @property
    def step_tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of streamed weights, activations and block gradients."""
        return 2 if self.precision == "bf16" else 4

    @property
    def streams_params(self) -> bool:
        return self.params != "gpu"

    @property
    def swaps_checkpoints(self) -> bool:
        return self.activations in ("cpu", "ssd")

    def optimizer_tier(self, block: int | None) -> str:
        """Where block `block`'s optimizer state lives ("cpu" or "ssd"); None: the outer group's.
        The runtime's rule (`fuyou.runtime.Placement.optimizer_tier` says why those blocks)."""
        if self.optimizer == "cpu" or self.optimizer_cpu_blocks is None:
            return self.optimizer
        return "cpu" if block is None or block < self.optimizer_cpu_blocks else "ssd"

    def replace(self, **changes) -> Plan:
        return dataclasses.replace(self, **changes)

    def config_overrides(self) -> list[str]:
        """The `fuyou train` overrides that run this plan (the runtime swaps no block internals yet)."""
        return [
            f"offload.params={self.params}",
            f"offload.optimizer={self.optimizer}",
            f"offload.activations={self.activations}",
            f"offload.prefetch_depth={self.prefetch_depth}",
            f"train.batch_size={self.micro_batch_size}",
            f"train.grad_accum={self.grad_accum}",
            f"train.seq_len={self.seq_len}",
        ] + ([f"offload.optimizer_cpu_blocks={self.optimizer_cpu_blocks}"] if self.optimizer_cpu_blocks is not None else []) + (
            [f"offload.outer_optimizer={self.outer_optimizer}"] if self.outer_optimizer != "cpu" else [])

    def describe(self) -> str:
        """One line, e.g. 'params cpu, optimizer ssd (blocks 0-15 in RAM), activations cpu, micro-batch 8 x 4, depth 1'."""
        optimizer = self.optimizer
        if self.optimizer_cpu_blocks is not None:
            optimizer += (f" (blocks 0-{self.optimizer_cpu_blocks - 1} and embeddings/head in RAM)" if self.optimizer_cpu_blocks
                          else " (embeddings/head in RAM)")
        text = (f"params {self.params}, optimizer {optimizer}, activations {self.activations}, "
                f"micro-batch {self.micro_batch_size} x {self.grad_accum}, seq {self.seq_len}, depth {self.prefetch_depth}")
        if self.outer_optimizer != "cpu":
            text += f", outer optimizer {self.outer_optimizer}"
        if self.swapped_attention_blocks or self.swapped_mlp_blocks:
            text += (f", swapped internals attn {self.swapped_attention_blocks} / mlp {self.swapped_mlp_blocks} "
                     f"blocks on {self.internals_tier}")
        return text
