"""Cost model of one Fuyou training step: FLOPs, bytes per link, overlap -> iteration time, TFLOPS and
peak memory per tier, for a `Plan` on a `HardwareProfile`, from `TransformerConfig` numbers only (no
tensor is allocated, so a 175B model prices in microseconds).

Legend: L blocks, j a block, D hidden, H query heads, K key/value heads, E head dim, F feed-forward size,
V vocabulary, B micro-batch, S sequence, T = B*S tokens of one micro-batch, A micro-batches per step
(grad_accum), P_b parameters of one block, N parameters of the model, R the GPU's GEMM rate.

The schedule priced here (fuyou/schedule.py, after the Fuyou paper, arXiv 2403.06504, section 4):
    forward, per block j:   compute block j  ||  H2D weights j+d  ||  D2H x_j (swap)  ||  SSD read/write
    head:                   logits, loss, dloss/dx_L
    backward, per block j:  recompute + backprop block j  ||  H2D weights j-d and x_{j-1}  ||  D2H grads j
                            ||  CPU AdamW on block j+1 (last micro-batch)  ||  SSD optimizer state r/w
    epilogue:               block 0's and the outer group's (embeddings, head) gradients out, their
                            updates, the outer weights back in: nothing left to overlap them with
                            (outer_optimizer "gpu": only block 0's; the outer group's update on the
                            GPU takes milliseconds and is not priced).
Each stage's resources run concurrently, so a block's time is the max of its legs (compute, PCIe,
SSD, CPU); a phase is L such steady-state block times; the prologue (first weights in) and the
epilogue add on top. Iteration = A x (prologue + forward + head + backward) + epilogue.

Optimizer state split (`plan.optimizer_cpu_blocks` = K, optimizer "ssd"): as the runtime places it
(fuyou.runtime.Placement.optimizer_tier), blocks 0..K-1 and the outer group keep their state in RAM and
only blocks K..L-1 read and write theirs on the SSD in their update; None puts every group, the outer
one too, on the SSD. More blocks in RAM only remove SSD bytes, so the step is never slower for a larger K.

Gradient ring (`gradient_ring` = n > 0, what the runtime uses when a step is one micro-batch without
clipping): the fp32 gradients go through n buffers as large as the largest group instead of a 4 B/param
accumulator. It changes memory only: a single micro-batch's gradient lands in its buffer as it would in
the accumulator (no CPU pass either way).

Deferred updates (`deferred_updates=True`): when the previous step clipped, the runtime cannot apply
an update before the step's global gradient norm is known, so every update runs after backward, in
forward order, and the next forward of block j waits for block j's update (fuyou/schedule.py). Then
the CPU leg moves from the backward stages to the forward stages (forward block j || update j+1), and
the epilogue adds the outer group's and block 0's updates, which nothing hides. Their AdamW applies
the clip factor, priced at the probe's clipped rate where measured.

The CPU worker (one thread, torch's kernels use the cores) does, per block and step:
    AdamW                      P_b / adam rate
    publish: fp32 -> weights   (4 + b) P_b bytes / pass rate   (b compute bytes per weight; none with
                               params "master", whose fetches move the 4 P_b fp32 masters instead of b P_b)
    micro-batches 2..A         one add each into the fp32 accumulator: 12 P_b bytes / pass rate
    norm, when A > 1           4 P_b bytes / pass rate (A = 1: the GPU takes it)
with both rates as the probe measured them under the runtime's load (pinned block-sized groups while
the GPU computes and PCIe copies stream both ways: `cpu_adam_loaded_gparams_per_s`,
`cpu_memory_loaded_gbps`), else alone (`cpu_adam_gparams_per_s`, `cpu_memory_gbps`). The epilogue's few
updates run with less beside them; they are priced at the same rate.

SSD: a stage's r bytes read and w written take max(r / read, w / write, (r + w) / duplex) on the array,
where `ssd_duplex_gbps` is the probe's rate with reads and writes in flight at once (the optimizer
reads one group's state ahead while it writes another's behind); without it, r / read + w / write
(they take turns: an upper bound).

FLOP conventions (three, all reported; a multiply-add is 2 FLOPs):
    hardware FLOPs  what the GPU executes: forward + backward (2 x forward) + recompute + head. The
                    recompute skips each block's down projection (its output is never read), unless
                    the plan says otherwise (`recompute_last_linear`: whole-block checkpointing, as
                    torch's and DeepSpeed's, and the Megatron count below).
                    Matmuls 2*T*(matmul weights); attention scores and values 4*B*S^2*H*E (the full
                    S x S square, as Megatron counts it, although causal kernels skip about half).
    model FLOPs     6 * N * tokens, the project's `model_tflops` metric (README): no recompute, no
                    attention term, embeddings counted as if they were matmuls.
    Megatron FLOPs  24 * c * B * S * L * D^2 * (1 + S/(6D) + V/(16 L D)), c = 4 with activation
                    checkpointing (forward counted twice), 3 without: Narayanan et al. 2021 (Megatron-LM,
                    appendix), the formula DeepSpeed/Megatron training scripts print. GPT layout (F = 4D)
                    only; the usual yardstick of offloading papers.

Compute is priced at `hardware.block_tflops` = gpu_tflops x block_efficiency, the rate the probe
measured for a whole block (norms, activations, residual adds, attention, launches included).

What it does NOT model (each a known source of error):
    - how block efficiency changes with shape: the probe measures one block shape (GPT-3 2.7B, 8 x 2048)
      and the same fraction is applied to every model and batch; small T and small D run below it;
    - causal attention doing half the S^2 work (counted in full, and inside the measured efficiency);
    - contention beyond what the loaded CPU rates measure: SSD DMA sharing DRAM with the optimizer;
      PCIe shared by the GPU and the SSDs behind one root complex; the GPU's rate under concurrent DMA;
    - jitter: per-block times are equal, so a prefetch depth beyond 1 buys no time here (only memory);
    - filesystem, RAID and page-cache effects, GPUDirect, pinned-memory registration, first-step warm-up;
    - which steps clip: the caller says whether updates are deferred (steps after a clipped one);
    - the gradient ring's backpressure (backward waits while all n buffers await their updates);
    - allocator fragmentation beyond a fixed `GPU_RESERVED_BYTES`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

from fuyou.models import TransformerConfig
from fuyou.plan.hardware import HardwareProfile
from fuyou.plan.policy import Plan
from fuyou.runtime import GRAD_BYTES_PER_PARAM, SSD_GROUPS_IN_FLIGHT, STATE_BYTES_PER_PARAM
from fuyou.schedule import HEAD_CHUNK_TOKENS

GiB = 1 << 30
# the runtime's numbers (fuyou.runtime.memory_need), so the planner and the runtime's check agree
OPTIMIZER_BYTES_PER_PARAM = STATE_BYTES_PER_PARAM  # fp32 master + exp_avg + exp_avg_sq
GRAD_ACCUMULATOR_BYTES_PER_PARAM = GRAD_BYTES_PER_PARAM  # the runtime's fp32 gradient sum on the CPU
OUTER_BYTES_PER_PARAM_ON_GPU = 8  # outer group (embeddings, head) resident in fp32, plus its fp32 .grad
OUTER_MOMENTS_BYTES_PER_PARAM = 8  # with outer_optimizer "gpu": its exp_avg and exp_avg_sq there too
# CUDA context (~0.3-0.5 GiB) plus allocator slack: the part of the GPU no tensor of ours can use.
GPU_RESERVED_BYTES = 1 * GiB


# ---- FLOPs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockFlops:
    """Forward FLOPs of one block for one micro-batch, split into the halves that can be swapped."""

    attention: float  # 2T(qkv + o weights) + 4 B S^2 H E
    mlp: float  # 2T(MLP weights)
    last_linear: float = 0.0  # 2T F D, the down projection (part of `mlp`): the runtime's recompute skips it

    @property
    def forward(self) -> float:
        return self.attention + self.mlp


def block_matmul_params(model: TransformerConfig) -> tuple[int, int]:
    """(attention, MLP) matmul weights of one block: biases and norms do no matmul."""
    D, H, K, E, F = model.hidden_size, model.num_heads, model.kv_heads, model.head_dim, model.ffn_size
    attention = D * (H + 2 * K) * E + H * E * D  # fused q/k/v projection, output projection
    mlp = 2 * D * F if model.family == "gpt" else 3 * D * F  # up+down, or gate+up+down (SwiGLU)
    return attention, mlp


@functools.lru_cache(maxsize=1024)  # called per block and per candidate plan; the answer is tiny
def block_forward_flops(model: TransformerConfig, micro_batch_size: int, seq_len: int) -> BlockFlops:
    """Forward FLOPs of one block: 2 FLOPs per multiply-add of each matmul, plus attention's quadratic term
    (Q K^T and softmax(.) V: 2 x 2*B*H*S*S*E)."""
    T = micro_batch_size * seq_len
    attention_params, mlp_params = block_matmul_params(model)
    quadratic = 4 * micro_batch_size * seq_len * seq_len * model.num_heads * model.head_dim
    return BlockFlops(attention=2 * T * attention_params + quadratic, mlp=2 * T * mlp_params,
                      last_linear=2 * T * model.ffn_size * model.hidden_size)


def block_recompute_flops(model: TransformerConfig, plan: Plan, j: int) -> float:
    """Block j's forward redone in backward: the forward minus its swapped halves and, unless
    `plan.recompute_last_linear`, minus the down projection, whose output backprop never reads (the
    runtime skips it: fuyou.models.transformer, `output_unused`). With activations "none", x_j is first
    rebuilt from x_0 through blocks 0..j-1, whose outputs are read: j whole forwards more."""
    flops = block_forward_flops(model, plan.micro_batch_size, plan.seq_len)
    recompute = flops.forward
    if j < plan.swapped_attention_blocks:
        recompute -= flops.attention
    if j < plan.swapped_mlp_blocks:
        recompute -= flops.mlp
    elif not plan.recompute_last_linear:
        recompute -= flops.last_linear
    if plan.activations == "none":
        recompute += j * flops.forward
    return recompute


def head_forward_flops(model: TransformerConfig, tokens: int) -> float:
    """LM head: logits = x W^T, 2*T*D*V."""
    return 2 * tokens * model.hidden_size * model.vocab_size


def recompute_flops_per_micro_batch(model: TransformerConfig, plan: Plan) -> float:
    """Forward work redone in backward, all blocks, one micro-batch (`block_recompute_flops` summed)."""
    return sum(block_recompute_flops(model, plan, j) for j in range(model.num_layers))


def megatron_flops(model: TransformerConfig, batch_size: int, seq_len: int, checkpointing: bool = True) -> float:
    """Narayanan et al. 2021: 24 c B S L D^2 (1 + S/(6D) + V/(16 L D)), c = 4 with checkpointing else 3."""
    B, S, L, D, V = batch_size, seq_len, model.num_layers, model.hidden_size, model.vocab_size
    c = 4 if checkpointing else 3
    return 24 * c * B * S * L * D * D * (1 + S / (6 * D) + V / (16 * L * D))


def model_flops(model: TransformerConfig, tokens: int) -> float:
    """6 N tokens: forward 2N, backward 4N per token (Kaplan et al. 2020); the README's model TFLOPS."""
    return 6 * model.num_parameters() * tokens


# ---- bytes --------------------------------------------------------------------------------------


def internals_elements_per_token(model: TransformerConfig) -> tuple[int, int]:
    """(attention, MLP) elements autograd saves per token inside a block, beyond its input x_j.

    attention: norm output (D, the q/k/v projection's input), q/k/v ((H+2K)E), the attention output (HE,
               also the output projection's input); flash attention keeps no S x S matrix.
    MLP:       the residual stream after attention (D), the norm output (D), the up projection's output
               (F; SwiGLU: gate and up, 2F), the activation's output (F).
    """
    D, H, K, E, F = model.hidden_size, model.num_heads, model.kv_heads, model.head_dim, model.ffn_size
    attention = D + (H + 2 * K) * E + H * E
    mlp = 2 * D + (2 * F if model.family == "gpt" else 3 * F)
    return attention, mlp


@dataclass(frozen=True)
class Sizes:
    """Byte sizes one step moves or holds."""

    block_param_bytes: int  # P_b x compute bytes: one block's weights as compute reads them
    block_fetch_bytes: int  # what one fetch of them moves: P_b x compute bytes, or 4 P_b from the masters
    block_grad_bytes: int  # 4 P_b: one block's fp32 gradient on its way to the CPU
    block_optimizer_bytes: int  # 12 P_b
    checkpoint_bytes: int  # x_j: T x D x 4 (fp32, see `sizes`)
    attention_internals_bytes: int
    mlp_internals_bytes: int
    outer_params: int  # parameters outside the blocks (embeddings, final norm, untied head)
    num_params: int


def sizes(model: TransformerConfig, plan: Plan) -> Sizes:
    P_b, T, b = model.num_block_parameters(), plan.micro_batch_tokens, plan.compute_bytes
    attention_elements, mlp_elements = internals_elements_per_token(model)
    N = model.num_parameters()
    return Sizes(
        block_param_bytes=P_b * b,
        block_fetch_bytes=P_b * (4 if plan.params == "master" else b),
        block_grad_bytes=4 * P_b,  # fp32: the runtime casts on the GPU before D2H
        block_optimizer_bytes=OPTIMIZER_BYTES_PER_PARAM * P_b,
        # The residual stream stays fp32 under bf16 autocast (fp32 embedding output, fp32 + bf16 adds), so
        # each saved x_j is fp32 in the runtime (fuyou.runtime.memory_need counts it so).
        checkpoint_bytes=T * model.hidden_size * 4,
        attention_internals_bytes=T * attention_elements * b,
        mlp_internals_bytes=T * mlp_elements * b,
        outer_params=N - model.num_layers * P_b,
        num_params=N,
    )


# ---- time of one overlapped stage -----------------------------------------------------------------


@dataclass(frozen=True)
class Legs:
    """Work of one pipeline stage (one block in forward or backward), per resource."""

    compute_flops: float = 0.0
    h2d_bytes: float = 0.0
    d2h_bytes: float = 0.0
    ssd_read_bytes: float = 0.0
    ssd_write_bytes: float = 0.0
    optimizer_params: float = 0.0
    cpu_bytes: float = 0.0  # the CPU worker's other passes (casts, gradient adds, norms): bytes read + written

    def __add__(self, other: Legs) -> Legs:
        return Legs(*(getattr(self, name) + getattr(other, name) for name in _LEG_FIELDS))

    def scaled(self, factor: float) -> Legs:
        return Legs(*(getattr(self, name) * factor for name in _LEG_FIELDS))


_LEG_FIELDS = [f.name for f in fields(Legs)]


@dataclass(frozen=True)
class LegTimes:
    compute_s: float
    pcie_s: float  # both directions overlapped (see `leg_times`)
    ssd_s: float
    optimizer_s: float
    h2d_s: float = 0.0  # each direction alone, for work that runs one step after the other
    d2h_s: float = 0.0

    @property
    def overlapped_s(self) -> float:
        """All resources at once: the slowest leg sets the pace."""
        return max(self.compute_s, self.pcie_s, self.ssd_s, self.optimizer_s)

    @property
    def serial_s(self) -> float:
        """One after the other (prologue and epilogue work that nothing hides): D2H, update, H2D in turn."""
        return self.compute_s + self.h2d_s + self.d2h_s + self.ssd_s + self.optimizer_s

    @property
    def bottleneck(self) -> str:
        times = {"compute": self.compute_s, "pcie": self.pcie_s, "ssd": self.ssd_s, "optimizer": self.optimizer_s}
        return max(times, key=times.get)


def leg_times(legs: Legs, hardware: HardwareProfile, clipped: bool = False) -> LegTimes:
    """Seconds each resource needs for `legs` (`clipped`: its AdamW applies a clip factor).

    compute  flops / (gpu_tflops x block_efficiency)
    PCIe     max(H2D / h2d, D2H / d2h, (H2D + D2H) / duplex): directions are separate lanes, but a
             measured duplex rate below h2d + d2h caps them together
    SSD      max(read / array read, write / array write, (read + write) / array duplex): striping scales
             each rate with the count; reads and writes share the drives, and the measured duplex rate
             says how well they overlap. No duplex rate: read / array read + write / array write
    CPU      params / AdamW rate + other passes' bytes / CPU memory rate (one worker: they add), both
             under the runtime's load where the probe measured that; a clipped update's AdamW at the
             clipped rate (torch folds the factor into its kernel, which runs slower)
    """
    h2d_s, d2h_s = legs.h2d_bytes / (hardware.h2d_gbps * 1e9), legs.d2h_bytes / (hardware.d2h_gbps * 1e9)
    pcie_s = max(h2d_s, d2h_s)
    if hardware.pcie_duplex_gbps is not None:
        pcie_s = max(pcie_s, (legs.h2d_bytes + legs.d2h_bytes) / (hardware.pcie_duplex_gbps * 1e9))
    ssd_s = 0.0
    if legs.ssd_read_bytes or legs.ssd_write_bytes:
        assert hardware.ssd_count > 0, "an SSD placement on a machine without SSDs (the planner rejects it)"
        read_s = legs.ssd_read_bytes / (hardware.ssd_array_read_gbps * 1e9)
        write_s = legs.ssd_write_bytes / (hardware.ssd_array_write_gbps * 1e9)
        duplex_gbps = hardware.ssd_array_duplex_gbps
        ssd_s = (read_s + write_s if duplex_gbps is None
                 else max(read_s, write_s, (legs.ssd_read_bytes + legs.ssd_write_bytes) / (duplex_gbps * 1e9)))
    pass_gbps = hardware.worker_memory_gbps
    adam_gparams_per_s = hardware.worker_clipped_adam_gparams_per_s if clipped else hardware.worker_adam_gparams_per_s
    return LegTimes(
        compute_s=legs.compute_flops / (hardware.block_tflops * 1e12),
        pcie_s=pcie_s,
        ssd_s=ssd_s,
        optimizer_s=legs.optimizer_params / (adam_gparams_per_s * 1e9)
        + (legs.cpu_bytes / (pass_gbps * 1e9) if pass_gbps else 0.0),
        h2d_s=h2d_s,
        d2h_s=d2h_s,
    )


# ---- the schedule -------------------------------------------------------------------------------


def forward_block_legs(model: TransformerConfig, plan: Plan, size: Sizes, j: int) -> Legs:
    """Block j's forward: compute it, bring weights j+d in, swap its saved activations out."""
    flops = block_forward_flops(model, plan.micro_batch_size, plan.seq_len)
    swapped_internals = _swapped_internals_bytes(plan, size, j)
    checkpoint_out = size.checkpoint_bytes if plan.swaps_checkpoints else 0
    return Legs(
        compute_flops=flops.forward,
        h2d_bytes=size.block_fetch_bytes if plan.streams_params else 0,
        d2h_bytes=checkpoint_out + swapped_internals,
        ssd_read_bytes=size.block_param_bytes if plan.params == "ssd" else 0,
        ssd_write_bytes=(checkpoint_out if plan.activations == "ssd" else 0)
        + (swapped_internals if plan.internals_tier == "ssd" else 0),
    )


def backward_block_legs(model: TransformerConfig, plan: Plan, size: Sizes, j: int) -> Legs:
    """Block j's backward: recompute and backprop it, weights and saved activations back in.

    Its gradient leaves, and (with `update`, on the last micro-batch) the CPU AdamW of the block and its
    optimizer state's SSD traffic run, only after its compute: `predict` puts them on the next stage.
    """
    flops = block_forward_flops(model, plan.micro_batch_size, plan.seq_len)
    L = model.num_layers
    recompute = block_recompute_flops(model, plan, j)
    swapped_internals = _swapped_internals_bytes(plan, size, j)
    checkpoint_in = size.checkpoint_bytes if plan.swaps_checkpoints else 0
    legs = Legs(
        compute_flops=2 * flops.forward + recompute,
        h2d_bytes=(size.block_fetch_bytes if plan.streams_params else 0) + checkpoint_in + swapped_internals,
        ssd_read_bytes=(size.block_param_bytes if plan.params == "ssd" else 0)
        + (checkpoint_in if plan.activations == "ssd" else 0)
        + (swapped_internals if plan.internals_tier == "ssd" else 0),
    )
    assert 0 <= j < L
    return legs


def gradient_out_legs(model: TransformerConfig, plan: Plan, size: Sizes, k: int, update_block: int | None = None) -> Legs:
    """Micro-batch k's gradient of a finished block to the CPU and its accounting there; with `update_block`
    = j (the last micro-batch, updates not deferred) block j's AdamW step too.

    The gradient crosses as fp32 (the runtime casts on the GPU, so the CPU adds fp32 into fp32). The
    first micro-batch lands in the accumulator (no CPU pass); later ones are added (read 2 x 4, write 4
    bytes per parameter); the last of several also takes the norm (read 4).
    """
    P_b = model.num_block_parameters()
    last = k == plan.grad_accum - 1
    cpu_bytes = (12 * P_b if k > 0 else 0) + (4 * P_b if last and plan.grad_accum > 1 else 0)
    legs = Legs(d2h_bytes=4 * P_b, cpu_bytes=cpu_bytes)
    if update_block is not None:
        legs = legs + block_update_legs(model, plan, size, update_block)
    return legs


def block_update_legs(model: TransformerConfig, plan: Plan, size: Sizes, j: int) -> Legs:
    """Block j's AdamW; its state moves through the SSD only when block j's state lives there."""
    published_bytes = 0 if plan.params == "master" else size.block_param_bytes  # from the masters: nothing to publish
    return _update_legs(plan, size.block_optimizer_bytes, published_bytes, model.num_block_parameters(),
                        on_ssd=plan.optimizer_tier(j) == "ssd")


def _update_legs(plan: Plan, optimizer_bytes: int, param_bytes: int, num_params: int, on_ssd: bool) -> Legs:
    """One group's AdamW: read/write its state (SSD read + write of 12 B/param when `on_ssd`), publish the
    new compute-precision weights (to the SSD when params live there; H2D when they are resident on the
    GPU; into RAM otherwise)."""
    return Legs(
        optimizer_params=num_params,
        cpu_bytes=(4 + plan.compute_bytes) * num_params if param_bytes else 0,  # the publish cast
        ssd_read_bytes=optimizer_bytes if on_ssd else 0,
        ssd_write_bytes=(optimizer_bytes if on_ssd else 0) + (param_bytes if plan.params == "ssd" else 0),
        h2d_bytes=param_bytes if plan.params == "gpu" else 0,
    )


def _swapped_internals_bytes(plan: Plan, size: Sizes, j: int) -> int:
    # Swapped halves go to the lowest-index blocks: all blocks cost the same, so which ones does not matter.
    return (size.attention_internals_bytes if j < plan.swapped_attention_blocks else 0) + (
        size.mlp_internals_bytes if j < plan.swapped_mlp_blocks else 0
    )


@dataclass(frozen=True)
class Prediction:
    """Predicted step time, its breakdown, throughput and memory for one Plan on one machine.

    The `*_busy_s` totals are how long each resource works in the step (overlapped or not); the phase
    times add up to `iteration_s`.
    """

    plan: Plan
    iteration_s: float
    prologue_s: float  # first weights in, per micro-batch, times A
    forward_s: float  # steady-state forward, all micro-batches
    head_s: float
    backward_s: float
    epilogue_s: float
    compute_busy_s: float
    pcie_busy_s: float
    ssd_busy_s: float
    optimizer_busy_s: float
    forward_bottleneck: str
    backward_bottleneck: str
    step_tokens: int
    hardware_flops: float
    model_flops: float
    megatron_flops: float
    gpu_peak_bytes: int
    cpu_peak_bytes: int
    ssd_bytes: int
    pcie_bytes: int
    ssd_traffic_bytes: int

    @property
    def tflops(self) -> float:
        """Model TFLOPS: 6 N tokens / iteration time (the README's `model_tflops`)."""
        return self.model_flops / self.iteration_s / 1e12

    @property
    def hardware_tflops(self) -> float:
        return self.hardware_flops / self.iteration_s / 1e12

    @property
    def megatron_tflops(self) -> float:
        return self.megatron_flops / self.iteration_s / 1e12

    @property
    def tokens_per_s(self) -> float:
        return self.step_tokens / self.iteration_s


def gradient_ring_buffers(gradient_ring: int, grad_accum: int, clipping: bool) -> int:
    """The ring buffers the runtime uses: `offload.gradient_ring` when a step is one micro-batch and nothing
    clips (no group's gradient is needed after its own update), else 0 (a full-size accumulator)."""
    return gradient_ring if grad_accum == 1 and not clipping else 0


def predict(model: TransformerConfig, plan: Plan, hardware: HardwareProfile, *, deferred_updates: bool = False,
            gradient_ring: int = 0) -> Prediction:
    """Prices one optimizer step of `plan` (see the module docstring for the schedule and what is left out).

    Args:
        model, plan, hardware: what runs, how, and where.
        deferred_updates: price a step that follows a clipped one, whose updates wait for the global norm
            and overlap the next forward instead of this backward (module docstring).
        gradient_ring: fp32 gradient buffers in the runtime's ring, 0 for the full-size accumulator; only
            a step of one micro-batch without clipping has one (`gradient_ring_buffers`).
    """
    L, A = model.num_layers, plan.grad_accum
    assert plan.swapped_attention_blocks <= L and plan.swapped_mlp_blocks <= L
    assert plan.optimizer_cpu_blocks is None or plan.optimizer_cpu_blocks <= L, "a split beyond the model's blocks"
    assert not gradient_ring or (A == 1 and not deferred_updates), "the runtime rings gradients only without accumulation or clipping"
    size = sizes(model, plan)
    T = plan.micro_batch_tokens

    forward_legs = [forward_block_legs(model, plan, size, j) for j in range(L)]
    compute_legs = [backward_block_legs(model, plan, size, j) for j in range(L)]
    # Block j's gradient leaves (and, on the last micro-batch, its update runs) while block j-1 computes:
    # stage j carries block j+1's; stage L-1 carries none; block 0's is the epilogue (last micro-batch)
    # or overlaps the next micro-batch's forward (not priced as time).
    grads = [gradient_out_legs(model, plan, size, k) for k in range(A)]
    updates = [block_update_legs(model, plan, size, j) for j in range(L)]  # SSD traffic only for SSD blocks

    def out(k: int, j: int) -> Legs:
        """Micro-batch k's leaving of block j, with its update on the last micro-batch unless deferred."""
        return grads[k] + updates[j] if k == A - 1 and not deferred_updates else grads[k]

    timed: dict[Legs, LegTimes] = {}  # most blocks cost the same: price each distinct stage once

    def times(legs: Legs) -> LegTimes:
        if legs not in timed:  # deferred updates are those of clipped steps: the clip folded into AdamW
            timed[legs] = leg_times(legs, hardware, clipped=deferred_updates)
        return timed[legs]

    # Deferred: the first micro-batch's forward of block j overlaps block j+1's update (block 0's is in
    # the epilogue); otherwise forward stages carry no CPU work.
    forward_first = [times(legs + updates[j + 1]) if deferred_updates and j < L - 1 else times(legs)
                     for j, legs in enumerate(forward_legs)]
    forward_rest = [times(legs) for legs in forward_legs]
    backward = [[times(legs + out(k, j + 1)) if j < L - 1 else times(legs) for j, legs in enumerate(compute_legs)]
                for k in range(A)]

    # prologue (per micro-batch): block 0's weights must arrive before it computes (the next d overlap it)
    first_load = Legs(h2d_bytes=size.block_fetch_bytes if plan.streams_params else 0,
                      ssd_read_bytes=size.block_param_bytes if plan.params == "ssd" else 0)
    prologue_s = A * leg_times(first_load, hardware).serial_s
    forward_s = sum(t.overlapped_s for t in forward_first) + (A - 1) * sum(t.overlapped_s for t in forward_rest)
    head_flops = 3 * head_forward_flops(model, T)  # forward, and backward = 2 x forward
    head_s = A * head_flops / (hardware.block_tflops * 1e12)
    backward_s = sum(sum(t.overlapped_s for t in stages) for stages in backward)

    # epilogue: block 0's gradient out and its update; the outer group's fp32 gradient out, its update, its
    # fp32 weights back in. Serial: the next step's forward starts with exactly these weights. Its state
    # is on the SSD only without a split (a split keeps it in RAM: updated last, read first).
    outer = Legs(d2h_bytes=4 * size.outer_params, h2d_bytes=4 * size.outer_params) + _update_legs(
        plan.replace(params="cpu"), OPTIMIZER_BYTES_PER_PARAM * size.outer_params, 0, size.outer_params,
        on_ssd=plan.optimizer_tier(None) == "ssd",
    )
    if plan.outer_optimizer == "gpu":
        # updated beside its weights: 28 B/param of HBM traffic, ~2 ms for 0.2B parameters; not priced
        outer = Legs()
    block_0 = out(A - 1, 0) + (updates[0] if deferred_updates else Legs())
    epilogue_s = (leg_times(block_0, hardware, clipped=deferred_updates).serial_s
                  + leg_times(outer, hardware, clipped=deferred_updates).serial_s)

    iteration_s = prologue_s + forward_s + head_s + backward_s + epilogue_s

    # what each resource does in the whole step, overlapped or not (the breakdown)
    total = sum([legs.scaled(A) for legs in forward_legs + compute_legs], Legs())
    total = total + sum([grad.scaled(L) for grad in grads], Legs()) + sum(updates, Legs()) + outer + first_load.scaled(A)
    total_times = leg_times(total, hardware, clipped=deferred_updates)
    hardware_flops = total.compute_flops + A * head_flops

    gpu, cpu, ssd = peak_memory(model, plan, size, reserved_bytes=reserved_bytes(hardware), gradient_ring=gradient_ring)
    return Prediction(
        plan=plan,
        iteration_s=iteration_s,
        prologue_s=prologue_s,
        forward_s=forward_s,
        head_s=head_s,
        backward_s=backward_s,
        epilogue_s=epilogue_s,
        compute_busy_s=hardware_flops / (hardware.block_tflops * 1e12),
        pcie_busy_s=total_times.pcie_s,
        ssd_busy_s=total_times.ssd_s,
        optimizer_busy_s=total_times.optimizer_s,
        forward_bottleneck=_most_common(t.bottleneck for t in forward_first),
        backward_bottleneck=_most_common(t.bottleneck for t in backward[-1]),
        step_tokens=plan.step_tokens,
        hardware_flops=hardware_flops,
        model_flops=model_flops(model, plan.step_tokens),
        megatron_flops=megatron_flops(model, plan.batch_size, plan.seq_len, checkpointing=True),
        gpu_peak_bytes=gpu,
        cpu_peak_bytes=cpu,
        ssd_bytes=ssd,
        pcie_bytes=int(total.h2d_bytes + total.d2h_bytes),
        ssd_traffic_bytes=int(total.ssd_read_bytes + total.ssd_write_bytes),
    )


def _most_common(names) -> str:
    names = list(names)
    return max(set(names), key=names.count)


# ---- memory -------------------------------------------------------------------------------------


def reserved_bytes(hardware: HardwareProfile) -> int:
    """GPU memory no tensor of ours can use: a CUDA context and allocator slack; none on a CPU-only machine."""
    return GPU_RESERVED_BYTES if hardware.compute_device == "cuda" else 0


def peak_memory(model: TransformerConfig, plan: Plan, size: Sizes, reserved_bytes: int = GPU_RESERVED_BYTES,
                gradient_ring: int = 0) -> tuple[int, int, int]:
    """(GPU, CPU, SSD) bytes at the step's peak (`gradient_ring`: as `predict`'s).

    GPU  `reserved_bytes` + outer group (fp32 weights and grads; its moments with outer_optimizer "gpu") + block weights (all L if resident, else the
         block in use + d in flight; from the masters these are fp32, plus the cast in use) + one block's gradient + checkpoints (all L kept; or the two being
         swapped) + the larger of: one block's recompute/backward working set, the head's logits working set.
    CPU  fp32 gradients: the accumulator (4 N), or with a ring of n buffers n x 4 x (largest group:
         max(P_b, outer)) + optimizer state of the groups in RAM (12 B/param: all N on "cpu"; with a split
         K, the outer group and K blocks) + SSD_GROUPS_IN_FLIGHT buffers of the largest group on the SSD
         (read ahead, in update, written behind; as fuyou.runtime.memory_need) + weights if on CPU (all; on
         SSD: 2 staging blocks; "master": none) + swapped activations on CPU (one micro-batch's) + 2 pinned gradient
         staging blocks when A > 1 (the first micro-batch's gradient lands in its accumulator or ring
         buffer directly) + building: the runtime builds the model one block at a time from "meta", one
         block's fp32 weights, their flat copy and the cast ((4 + 4 + b) P_b) beside the outer group's
         fp32 weights (4 B/param), counted on top as fuyou.runtime.memory_need does (so a plan that fits
         here passes the runtime's check; a checkpoint loaded whole in fp32 is not priced).
    SSD  whatever lives there: weights, the optimizer state of the groups on the SSD (12 B/param), swapped
         activations of one micro-batch.
    """
    L, T, b = model.num_layers, plan.micro_batch_tokens, plan.compute_bytes
    depth = plan.prefetch_depth
    # streamed: the block in use and d in flight; from the masters, each lands in fp32 and is cast when used
    block_weights = (L * size.block_param_bytes if plan.params == "gpu" else (depth + 1) * size.block_fetch_bytes
                     + (size.block_param_bytes if plan.params == "master" else 0))
    checkpoints = {"gpu": L, "cpu": 2, "ssd": 2, "none": 2}[plan.activations] * size.checkpoint_bytes
    # working set of one block in backward: its recomputed internals, plus gradients of the largest
    # intermediate (F wide, 2F for SwiGLU's gate/up) and of the residual stream (x_j and dx_j)
    F_wide = model.ffn_size * (1 if model.family == "gpt" else 2)
    block_working = size.attention_internals_bytes + size.mlp_internals_bytes + T * b * F_wide + 2 * size.checkpoint_bytes
    # the head, in chunks of HEAD_CHUNK_TOKENS: logits (compute dtype), their fp32 log-softmax for the
    # loss, and the logits' gradient
    head_working = min(T, HEAD_CHUNK_TOKENS) * model.vocab_size * (b + 4 + b)
    outer_gpu_bytes_per_param = OUTER_BYTES_PER_PARAM_ON_GPU + (OUTER_MOMENTS_BYTES_PER_PARAM if plan.outer_optimizer == "gpu" else 0)
    gpu = (reserved_bytes + outer_gpu_bytes_per_param * size.outer_params + block_weights
           + size.block_grad_bytes + checkpoints + max(block_working, head_working))

    swapped_internals = (plan.swapped_attention_blocks * size.attention_internals_bytes
                         + plan.swapped_mlp_blocks * size.mlp_internals_bytes)
    N, P_b = size.num_params, model.num_block_parameters()
    # parameters of each group by where its optimizer state lives (the outer group is block None)
    state_params = {"cpu": 0, "ssd": 0}
    largest_on_ssd = 0
    outer_cpu_params = size.outer_params if plan.outer_optimizer == "cpu" else 0  # its state, and its gradient
    for block, num_params in [(None, outer_cpu_params)] + [(j, P_b) for j in range(L)]:
        tier = plan.optimizer_tier(block)
        state_params[tier] += num_params
        if tier == "ssd":
            largest_on_ssd = max(largest_on_ssd, num_params)
    optimizer_cpu = OPTIMIZER_BYTES_PER_PARAM * (state_params["cpu"] + SSD_GROUPS_IN_FLIGHT * largest_on_ssd)
    gradients_cpu = (gradient_ring * GRAD_ACCUMULATOR_BYTES_PER_PARAM * max(P_b, outer_cpu_params) if gradient_ring
                     else GRAD_ACCUMULATOR_BYTES_PER_PARAM * (N - size.outer_params + outer_cpu_params))
    weights_cpu = {"gpu": 0, "cpu": L * size.block_param_bytes, "ssd": 2 * size.block_param_bytes, "master": 0}[plan.params]
    activations_cpu = (L * size.checkpoint_bytes if plan.activations == "cpu" else 0) + (
        swapped_internals if plan.internals_tier == "cpu" else 0
    )
    staging_cpu = 2 * size.block_grad_bytes if plan.grad_accum > 1 else 0
    building_cpu = (4 + 4 + b) * P_b + 4 * size.outer_params
    cpu = gradients_cpu + optimizer_cpu + weights_cpu + activations_cpu + staging_cpu + building_cpu

    ssd = ((L * size.block_param_bytes if plan.params == "ssd" else 0)
           + OPTIMIZER_BYTES_PER_PARAM * state_params["ssd"]
           + (L * size.checkpoint_bytes if plan.activations == "ssd" else 0)
           + (swapped_internals if plan.internals_tier == "ssd" else 0))
    return int(gpu), int(cpu), int(ssd)
