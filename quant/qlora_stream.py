"""Streamed QLoRA: the frozen NF4 blocks live in pinned CPU memory and reach the GPU just ahead of use.

`quant.mode=qlora quant.stream=true`. A model whose 4-bit weights exceed the GPU (LLaMA-70B: ~37 GB of
NF4 codes and statistics) trains under a GPU cap: only the blocks in flight are on the GPU.

Legend: block j in 0..L-1, prefetch depth d; B batch, S sequence, D hidden, T = B*S tokens, V vocabulary.

One optimizer step, per micro-batch (after the Fuyou schedule, fuyou/schedule.py):

    forward   prologue:  fetch NF4 of blocks 0..d-1;  x_0 = embed(ids)
              steady:    fetch j+d | keep x_j (checkpoint) and the RNG state | x_{j+1} = block_j(x_j), no graph |
                         release j
              epilogue:  head and loss in token chunks (fuyou.schedule.head_loss_backward): dloss/dx_L
    backward  prologue:  fetch L-1..L-d;  recompute block_{L-1}
              steady:    fetch j-1-d | recompute block_{j-1} from x_{j-1} with its saved RNG state (same LoRA
                         dropout masks) | backprop block_j: LoRA grads accumulate, dloss/dx_j | release j
              epilogue:  backprop block_0
    Each recompute is issued one block ahead of its backprop: while the host sets up block j's backward
    (autograd engine, the compiled backward's launch: ~1 ms a block on the H100 host), the GPU runs block
    j-1's recompute instead of idling. It costs one more block's recompute graph and weights alive.
    With `quant.stream_cache_gb`, the forward also keeps chosen frozen linears' outputs (quant/output_cache.py)
    and the recompute returns them instead of running those GEMMs.
    then clip, learning rate and bitsandbytes' paged AdamW over the LoRA parameters, as the reference.

What stays on the compute device: the LoRA adapters (trainable, fp32), and in the compute dtype the
frozen norms and biases, embedding and LM head (bf16 on a GPU: half of the reference's fp32, 2.1 GB
instead of 4.2 GB each for LLaMA-3's 128K vocabulary), and the block checkpoints. The residual stream
runs in that dtype too (x_0 is the bf16 embedding and the norms return bf16, as in a bf16 Hugging Face
model; HF's `prepare_model_for_kbit_training` upcasts the norms, which makes the block outputs fp32),
which halves the checkpoints and the MLP's activations. On the CPU the
compute dtype is fp32, so there a streamed step equals the unstreamed one (tests/test_quant_qlora_stream.py).

What is a library's and what is written here, and why:
- NF4 with double quantization, the 4-bit matmul and its backward are bitsandbytes' (`Linear4bit`,
  `QuantState`, quantized one block at a time on the compute device by `quant.qlora.quantize_linears_nf4`);
  LoRA is peft's (`get_peft_model` through `quant.qlora.add_lora`); the optimizer is bitsandbytes' paged
  AdamW. Nothing numerical is re-implemented.
- Moving the weights is not in those libraries. bitsandbytes quantizes a weight where it lives and keeps
  its packed codes and statistics there. The offload hooks we know of (accelerate's, diffusers' group
  offloading) move a module's parameters and buffers, and a Params4bit's QuantState (absmax, nested
  absmax, code books, offset) is neither; accelerate's also copy on the compute stream when the module
  runs, with no prefetch and no GPU cap. transformers' 4-bit loading with CPU offload keeps the offloaded
  modules unquantized and computes them on the CPU. What is written here is that part: `Nf4Payload`, the
  byte layout of one block's NF4 tensors (the packed weight and every tensor of the QuantState of each
  Linear4bit, in one buffer so a block is one copy), with install/clear of views of a fetched buffer into
  the modules; and `StreamedQLoRA`, the schedule above.
  Every byte moves through the tiered store (`offload.TieredStore.put`/`fetch`, its copy streams and
  GPU cap), the prefetch is `fuyou.schedule.WeightStream`, the head and loss chunks are
  `fuyou.schedule.head_loss_backward`.
- Checkpointing is explicit rather than torch.utils.checkpoint: the block's weights must be fetched for
  the recompute, at a point the schedule chooses ahead of time, which a checkpoint hook cannot prefetch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext

import bitsandbytes as bnb
import peft
from peft.helpers import disable_input_dtype_casting
import torch
from torch import nn

from fuyou.block_compile import module_block_function
from fuyou.data import Batch
from fuyou.lr_schedule import lr_at_step
from fuyou.models import Transformer
from fuyou.reference import StepResult, optimizer_step
from fuyou.schedule import WeightStream, head_loss_backward
from offload import Tier, TieredStore
from quant.output_cache import FrozenOutputCache
from quant.qlora import (
    add_lora,
    check_lora_settings,
    default_compute_dtype,
    quantize_linears_nf4,
)

ALIGN_BYTES = 256  # each tensor's offset in a block's buffer: fp32 views stay aligned, loads stay wide
HEAD_CHUNK_TOKENS = 1024  # fp32 logits of a chunk at V = 128256: 0.5 GB, and as much again for their gradient
# QuantState fields that hold tensors, in the order they are laid out after the packed weight.
STATE_FIELDS = ("absmax", "code", "offset", "state2.absmax", "state2.code")


def payload_name(j: int) -> str:
    """The store's name for block j's NF4 payload."""
    return f"qlora.nf4.block.{j}"


class Nf4Payload:
    """One block's frozen NF4 tensors as one flat uint8 buffer, and the Linear4bit modules they belong to.

    Per Linear4bit: the packed weight (uint8 [(O*I+1)//2, 1]) and its QuantState's tensors (absmax: uint8
    with double quantization, else fp32; code: fp32 [16]; offset: fp32 []; state2.absmax: fp32; state2.code:
    fp32 [256]), each at a multiple of ALIGN_BYTES. The QuantState's other fields (shape, dtype, blocksize,
    quant type) stay with the module as a template.

    Args:
        block: a block whose block linears are quantized Linear4bit modules holding their tensors.
    """

    def __init__(self, block: nn.Module) -> None:
        self.modules = [module for module in block.modules() if isinstance(module, bnb.nn.Linear4bit)]
        assert self.modules, "no Linear4bit in this block: quantize it first"
        self.device = self.modules[0].weight.device
        self._templates: list[bnb.functional.QuantState] = []
        # (module index, field, dtype, shape, byte offset, bytes)
        self.slots: list[tuple[int, str, torch.dtype, torch.Size, int, int]] = []
        num_bytes = 0
        for index, module in enumerate(self.modules):
            state = module.weight.quant_state
            template = copy.copy(state)
            if state.nested:
                template.state2 = copy.copy(state.state2)
            for field, tensor in [("weight", module.weight.data), *_state_tensors(state)]:
                _set_field(template, field, None)
                self.slots.append((index, field, tensor.dtype, tensor.shape, num_bytes, tensor.nbytes))
                num_bytes = _round_up(num_bytes + tensor.nbytes)
            self._templates.append(template)
        self.num_bytes = num_bytes
        self._empty = torch.empty(0, dtype=torch.uint8, device=self.device)

    def pack(self) -> torch.Tensor:
        """The installed tensors copied into one new uint8 buffer [num_bytes] on their device."""
        flat_u8 = torch.zeros(self.num_bytes, dtype=torch.uint8, device=self.device)
        for index, field, _, _, offset, num_bytes in self.slots:
            module = self.modules[index]
            tensor = module.weight.data if field == "weight" else _get_field(module.weight.quant_state, field)
            flat_u8[offset : offset + num_bytes].copy_(tensor.reshape(-1).view(torch.uint8))
        return flat_u8

    def install(self, flat_u8: torch.Tensor) -> None:
        """Point the modules at views of `flat_u8` (from `pack`, or a copy of it on another device)."""
        states = []
        for template in self._templates:
            state = copy.copy(template)
            if template.nested:
                state.state2 = copy.copy(template.state2)
            states.append(state)
        for index, field, dtype, shape, offset, num_bytes in self.slots:
            view = flat_u8[offset : offset + num_bytes].view(dtype).view(shape)
            if field == "weight":
                self.modules[index].weight.data = view
            else:
                _set_field(states[index], field, view)
        for module, state in zip(self.modules, states, strict=True):
            module.weight.quant_state = state

    def clear(self) -> None:
        """Drop the modules' references to the installed tensors; running the block now fails loudly."""
        for module in self.modules:
            module.weight.data = self._empty
            module.weight.quant_state = None


def _state_tensors(state) -> list[tuple[str, torch.Tensor]]:
    fields = [field for field in STATE_FIELDS if state.nested or not field.startswith("state2.")]
    return [(field, _get_field(state, field)) for field in fields if _get_field(state, field) is not None]


def _get_field(state, field: str):
    owner, _, leaf = field.rpartition(".")
    return getattr(state.state2 if owner else state, leaf)


def _set_field(state, field: str, value) -> None:
    owner, _, leaf = field.rpartition(".")
    setattr(state.state2 if owner else state, leaf, value)


def _round_up(num_bytes: int) -> int:
    return -(-num_bytes // ALIGN_BYTES) * ALIGN_BYTES


def model_pieces(model: Transformer) -> list[nn.Module]:
    """Top-level modules with `blocks` split into its blocks, in `modules()` order (the order the
    seeded initialisation draws in, so materialising piece by piece gives the whole model's values)."""
    pieces = []
    for child in model.children():
        pieces.extend(child if child is model.blocks else [child])
    return pieces


def build_streamed_qlora(model: Transformer, *, store: TieredStore, device: torch.device,
                         materialize: Callable[[nn.Module], None] | None = None, rank: int = 16, alpha: float = 32.0,
                         dropout: float = 0.05, target_modules: list[str] | None = None,
                         compute_dtype: torch.dtype | None = None) -> tuple[peft.PeftModel, list[Nf4Payload]]:
    """Quantize `model` block by block on `device`, move each block's NF4 payload into `store`, add LoRA.

    Piece by piece, in `model_pieces` order: the piece is materialised on `device` (`materialize`) or
    moved there (a model already on the CPU); a block then has its block linears quantized to NF4 there
    (bitsandbytes), its payload packed and `put` in pinned CPU memory, and its GPU copy dropped; the
    embedding and LM head are cast to the compute dtype (frozen). So the unquantized model never exists
    whole: at most one block of it does, in its materialised dtype. Then peft puts LoRA adapters on the
    block linears' targets (on `device`, fp32). The global RNG is first drawn by peft's LoRA init, as in
    `quant.qlora.prepare_qlora`, so a seed gives both paths the same adapters.

    Args:
        model: our Transformer on "meta" (with `materialize`) or materialised on the CPU (without).
        store: holds the payloads (`payload_name(j)`, on the CPU tier); its GPU cap binds the build too.
        device: the compute device.
        materialize: allocates one meta piece on `device` and initialises it, e.g.
            `fuyou.models.Initializer(model, seed=s).materialize` with the device bound.
        rank, alpha, dropout, target_modules: LoRA, as `quant.qlora.prepare_qlora`.
        compute_dtype: NF4 compute dtype and the frozen embedding/head dtype; None: bf16 on CUDA, else fp32.

    Returns:
        (the PEFT model, whose blocks hold placeholders for their NF4 tensors; block j's `Nf4Payload`).

    Raises:
        ValueError: a rank below 1 or a target that names no block linear (before anything is built).
    """
    compute_dtype = compute_dtype or default_compute_dtype(device)
    block_linears = [name for name, module in model.blocks[0].named_modules() if type(module) is nn.Linear]
    check_lora_settings(block_linears, rank=rank, target_modules=target_modules)
    model.requires_grad_(False)
    blocks = {id(block): j for j, block in enumerate(model.blocks)}
    payloads = []
    for piece in model_pieces(model):
        if materialize is not None:
            materialize(piece)
        else:
            piece.to(device)
        if id(piece) in blocks:
            j = blocks[id(piece)]
            quantize_linears_nf4(piece, compute_dtype=compute_dtype)
            # The frozen norms (and biases) in the compute dtype too: an fp32 norm weight would promote the
            # norm's output, and with it the linears' outputs (Linear4bit returns its input's dtype) and
            # the residual stream, to fp32 (measured: block outputs fp32 from bf16 inputs).
            for parameter in piece.parameters():
                if parameter.dtype.is_floating_point:
                    parameter.data = parameter.data.to(compute_dtype)
            payload = Nf4Payload(piece)
            store.put(payload_name(j), payload.pack(), Tier.CPU).result()
            payload.clear()
            payloads.append(payload)
        elif isinstance(piece, nn.Embedding) or piece is model.lm_head:
            piece.to(compute_dtype)
    model.requires_grad_(False)  # materialised pieces keep the flag, a fresh one would not
    return add_lora(model, block_linears, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules), payloads


class StreamedQLoRA:
    """Optimizer steps of a streamed QLoRA model (module docstring); `step` as `ReferenceTrainer.step`.

    Args:
        model, payloads: from `build_streamed_qlora` (the payloads in `store`).
        store: the tiered store holding the payloads; closed by `close()`.
        device: the compute device.
        optimizer: e.g. `quant.qlora.make_paged_adamw(model, ...)`.
        lr, warmup_steps, total_steps, min_lr_ratio: the schedule (fuyou.lr_schedule).
        max_grad_norm: clip threshold over the LoRA gradients, or None (the norm is still reported).
        precision: "fp32" or "bf16" (autocast around blocks and head; the loss in fp32).
        prefetch_depth: d, blocks fetched ahead of the one computing (0: fetch on demand).
        head_chunk_tokens: tokens per head and loss chunk.
        cache_bytes: device memory for frozen linears' outputs kept from the forward, so the recompute
            skips their GEMMs (quant/output_cache.py); 0 recomputes every block whole.
        compile_blocks: run each block's forward, and its recompute with its backward, through one
            torch.compile'd function (`train.compile`, fuyou.block_compile): Inductor fuses the LoRA
            branches' scale and add, dropout, peft's clone, the norms, SiLU and the residual adds, which
            run as separate memory-bound kernels otherwise; bitsandbytes' 4-bit matmul is traced through
            its registered ops. Compiled dropout draws its masks from the same RNG state, so the restored
            state gives the recompute the forward's masks (they differ from eager dropout's).
    """

    def __init__(self, model: peft.PeftModel, payloads: list[Nf4Payload], store: TieredStore, *, device: torch.device,
                 optimizer: torch.optim.Optimizer, lr: float, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.1, max_grad_norm: float | None = None, precision: str = "fp32",
                 prefetch_depth: int = 1, head_chunk_tokens: int = HEAD_CHUNK_TOKENS, cache_bytes: int = 0,
                 compile_blocks: bool = False) -> None:
        assert precision in ("fp32", "bf16"), precision
        self.model, self.payloads, self.store, self.device = model, payloads, store, torch.device(device)
        self.base = model.get_base_model()
        self.optimizer = optimizer
        self.schedule = {"peak_lr": lr, "warmup_steps": warmup_steps, "total_steps": total_steps, "min_lr_ratio": min_lr_ratio}
        self.max_grad_norm, self.precision = max_grad_norm, precision
        self.depth, self.head_chunk_tokens = prefetch_depth, head_chunk_tokens
        self.compute_tier = Tier.GPU if self.device.type == "cuda" else Tier.CPU
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.nf4_bytes = sum(payload.num_bytes for payload in payloads)
        compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.cache = FrozenOutputCache(self.base.blocks, budget_bytes=cache_bytes,
                                       element_bytes=torch.empty((), dtype=compute_dtype).element_size())
        self.compiled_block = module_block_function() if compile_blocks else None
        self.step_index = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    # ---- block weights: fetch ahead, install, release ----------------------------------------------

    def _fetch(self, j: int):
        return self.store.fetch(payload_name(j), self.compute_tier)

    def _release(self, j: int, flat_u8: torch.Tensor) -> None:
        self.payloads[j].clear()
        self.store.free(flat_u8)

    def _stream(self, order: Sequence[int]) -> WeightStream:
        return WeightStream(order, self._fetch, self._release, self.depth)

    @contextlib.contextmanager
    def resident(self, j: int) -> Iterator[None]:
        """Block j's NF4 tensors installed on the compute device for the duration (e.g. a merged export)."""
        flat_u8 = self._fetch(j).result()
        self.payloads[j].install(flat_u8)
        try:
            yield
        finally:
            self._release(j, flat_u8)

    # ---- one step ------------------------------------------------------------------------------------

    def step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """One optimizer step over `micro_batches` (gradient accumulation = their number)."""
        self.model.train()
        # Under autocast the LoRA branch needs no input cast, yet peft (checking autocast without a device
        # type) casts each LoRA input to the adapters' fp32 and drops it out in fp32 (measured on the GPU).
        with disable_input_dtype_casting(self.model, active=self.precision == "bf16"):
            return self._step(micro_batches)

    def _step(self, micro_batches: Sequence[Batch]) -> StepResult:
        num_target_tokens = sum(batch.num_target_tokens for batch in micro_batches)
        denominator = max(1, num_target_tokens)
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            input_ids_BS = batch.input_ids.to(self.device, non_blocking=True)
            labels_BS = batch.labels.to(self.device, non_blocking=True)
            self.cache.plan_for(input_ids_BS.numel())
            try:
                checkpoints, rng_states, x_BSD = self._forward(input_ids_BS)
                micro_loss, grad_BSD = head_loss_backward(self.base.head, x_BSD, labels_BS, denominator,
                                                          autocast=self.autocast, chunk_tokens=self.head_chunk_tokens)
                del x_BSD
                self._backward(checkpoints, rng_states, grad_BSD)
            finally:
                self.cache.clear()  # taken by the recompute; only a failed step leaves outputs behind
            loss_sum += micro_loss

        result = optimizer_step(self.trainable, self.optimizer, max_grad_norm=self.max_grad_norm,
                                lr=lr_at_step(self.step_index, **self.schedule), loss_sum=loss_sum,
                                micro_batches=micro_batches)
        self.step_index += 1
        return result

    def _forward(self, input_ids_BS: torch.Tensor) -> tuple[list[torch.Tensor], list, torch.Tensor]:
        """Blocks without a graph; returns (x_j for each j, the RNG state before each block, x_L)."""
        L = len(self.payloads)
        checkpoints, rng_states = [], []
        with torch.no_grad():
            weights = self._stream(range(L))  # prologue: blocks 0..d-1 start moving while the embedding runs
            with self.autocast():
                x_BSD = self.base.embed(input_ids_BS)
            for _ in range(L):
                j, flat_u8 = weights.next()  # also starts fetching block j+d
                self.payloads[j].install(flat_u8)
                checkpoints.append(x_BSD)
                rng_states.append(self._rng_state())
                with self.autocast(), self.cache.recording(j):
                    x_BSD = self._block(j, x_BSD)
                weights.release(j, flat_u8)
        return checkpoints, rng_states, x_BSD

    def _backward(self, checkpoints: list[torch.Tensor], rng_states: list, grad_BSD: torch.Tensor) -> None:
        """Recompute each block from its checkpoint (same dropout masks) and backprop, last block first; each
        recompute is issued one block ahead of its backprop (module docstring)."""
        L = len(self.payloads)
        weights = self._stream(reversed(range(L)))

        def recompute(j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            visited, flat_u8 = weights.next()
            assert visited == j
            self.payloads[j].install(flat_u8)
            # Block 0's input gradient would only reach the frozen embedding: not computed, as in the reference.
            x_in_BSD = checkpoints.pop().detach().requires_grad_(j > 0)
            with torch.enable_grad(), self._restored_rng(rng_states[j]), self.autocast(), self.cache.replaying(j):
                y_BSD = self._block(j, x_in_BSD)
            return x_in_BSD, y_BSD, flat_u8

        ahead = recompute(L - 1)  # prologue
        for j in reversed(range(L)):
            x_in_BSD, y_BSD, flat_u8 = ahead
            ahead = recompute(j - 1) if j > 0 else None  # steady state: the next recompute goes first
            y_BSD.backward(grad_BSD)  # LoRA parameters' .grad accumulate over micro-batches
            grad_BSD = x_in_BSD.grad
            del y_BSD, x_in_BSD
            weights.release(j, flat_u8)

    def _block(self, j: int, x_BSD: torch.Tensor) -> torch.Tensor:
        block = self.base.blocks[j]
        return block(x_BSD) if self.compiled_block is None else self.compiled_block(block, x_BSD, False)

    def _rng_state(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    @contextlib.contextmanager
    def _restored_rng(self, state: tuple) -> Iterator[None]:
        """The RNG as it was before the block's forward; afterwards as it was before this (checkpoint's trick)."""
        cpu, cuda = state
        with torch.random.fork_rng(devices=[self.device] if cuda is not None else []):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            yield

    def close(self) -> None:
        """Release the store (pinned payloads, copy streams); idempotent."""
        self.store.close()
