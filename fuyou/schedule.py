"""The Fuyou step: forward and backward streamed block by block, the CPU optimizer overlapped with backward.

Legend: block j in 0..L-1, micro-batch k in 0..K-1 (K = train.grad_accum), prefetch depth d.
Shapes: B batch, S sequence, D hidden, V vocabulary. "Compute device": the GPU, or the CPU without one.

One optimizer step, after the Fuyou paper (arXiv 2403.06504, sections 4.2-4.4):

    for k in micro-batches:
        forward   prologue:  load weights 0..d-1;  x_0 = embed(ids_k)
                  steady:    load weights j+d | save x_j (swap out) | x_{j+1} = block_j(x_j) | free weights j
                  epilogue:  backward's prologue: load weights L-1..L-d and x_{L-1} (behind the head)
                             | logits = head(x_L); loss; dloss/dx_L
        backward  steady:    load weights j-d | load x_{j-1} | recompute block_j from x_j (all but its
                             last GEMM, whose output backprop never reads: Block.forward), backprop |
                             free weights j | gradient of j -> CPU, accumulated; on the last k the CPU
                             optimizer updates block j while the device goes on with block j-1
                  epilogue:  backprop through embed; embedding/head gradients -> CPU, their update
                             (outer_optimizer "gpu": they stay, updated on the device once c is known)
    after the last k: global gradient norm -> clip factor c; then (see "Clipping") the updates or
    fix-ups that still have to run are queued in forward order, and the next step's forward of block j
    waits only for block j's update, so those updates overlap the next forward.

Clipping stays exact despite the overlap. When the previous step did not clip, this step speculates
c = 1 and updates each block during backward (Fuyou's overlap); if the norm then asks for c < 1, an
exact fix-up (offload.cpu_optimizer) corrects moments and weights from the kept gradient, queued in
forward order so it overlaps the next step's forward. When the previous step clipped (clipping tends
to persist, and fix-ups lose precision where moments are small), this step defers: every update runs
after backward with the known c, again in forward order ahead of the next forward. Either way each
step's updates are complete before the next step reads those weights: no stale updates. The first
step defers too (see FuyouRuntime): a fix-up over every parameter costs several plain updates.

Gradient accumulation is exact: each micro-batch back-propagates its loss sum divided by the step's
total target count, and block gradients are summed in fp32 on the CPU in micro-batch order, as the
reference's `.grad` accumulation does. Embedding, final norm and LM head stay on the compute device in
fp32 for the whole step (as the reference sees them under autocast); their `.grad` accumulates there
(a tied embedding sums its two uses through autograd) and goes to the CPU once, after the last k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fuyou.block_compile import flat_block_function
from fuyou.data import IGNORE_INDEX
from offload.activations import ActivationSwap
from offload.streams import wait_for_device

HEAD_CHUNK_TOKENS = 4096  # tokens per head + loss chunk: bounds the logits' memory, keeps GEMMs large


class WeightStream:
    """Block weights on the compute device along a visiting `order`, each fetched `depth` visits ahead.

    Args:
        order: block indices in the order compute uses them (a block may recur).
        fetch: j -> future of block j's weight parts on the compute device.
        release: (j, parts) -> None, once compute is done with them.
        depth: how many visits ahead to fetch (0: fetch on demand).
        take: (j, fetched parts) -> the parts compute reads, called on the compute thread when the
            visit comes (a cast of what was fetched, say); default: the fetched parts.
    """

    def __init__(self, order: Sequence[int], fetch: Callable[[int], Future], release: Callable, depth: int,
                 take: Callable[[int, list[torch.Tensor]], list[torch.Tensor]] | None = None) -> None:
        self.order, self._fetch, self.release, self.depth = list(order), fetch, release, depth
        self._take = take or (lambda j, parts: parts)
        self._loads: dict[int, Future] = {}
        self._position = 0
        for position in range(min(depth, len(self.order))):  # prologue: the first d loads
            self._load(position)

    def _load(self, position: int) -> Future:
        if position not in self._loads:
            self._loads[position] = self._fetch(self.order[position])
        return self._loads[position]

    def next(self) -> tuple[int, list[torch.Tensor]]:
        """Waits for the next visit's weights and starts the load `depth` visits ahead of it."""
        position = self._position
        self._position += 1
        if position + self.depth < len(self.order):
            self._load(position + self.depth)
        parts = self._load(position).result()
        del self._loads[position]  # the future holds the weights: drop it, or every block stays alive
        j = self.order[position]
        return j, self._take(j, parts)


def loss_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies in fp32, skipping IGNORE_INDEX labels."""
    return F.cross_entropy(
        logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), labels_BS.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def head_loss_backward(head: Callable[[torch.Tensor], torch.Tensor], x_BSD: torch.Tensor, labels_BS: torch.Tensor,
                       denominator: int, *, autocast: Callable[[], AbstractContextManager], chunk_tokens: int,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The head and the loss over `chunk_tokens` tokens at a time, each chunk back-propagated at once.

    Fp32 logits of a whole micro-batch are T*V*4 bytes (13 GB at 32 x 2048 tokens and V = 50257; 1 GB at
    2048 tokens and V = 128256), plus their gradient: a chunk bounds them while its GEMM stays large.
    Tokens are chunked across row boundaries (the loss is a sum over tokens), so a long sequence is
    split too. Each chunk's backward adds to the head parameters' .grad (when they require it) and to
    dloss/dx. The loss stays on the device: reading it here would stall the device queue.

    Args:
        head: x_TD -> logits_TV (final norm and LM head), e.g. `Transformer.head`.
        x_BSD: the last block's output (no graph needed: it is detached here).
        labels_BS: targets, IGNORE_INDEX where no loss is taken.
        denominator: the step's target-token count; each chunk back-propagates its loss sum over it.
        autocast: () -> the context the head runs under (bf16 autocast, or none).
        chunk_tokens: tokens per chunk.

    Returns:
        (the micro-batch's loss sum, a 0-dim fp32 tensor; dloss/dx_BSD).
    """
    x_TD = x_BSD.detach().reshape(-1, x_BSD.shape[-1]).requires_grad_()
    labels_T = labels_BS.reshape(-1)
    micro_loss = torch.zeros((), device=x_TD.device)
    with torch.enable_grad():
        for start in range(0, x_TD.shape[0], chunk_tokens):
            with autocast():
                logits_TV = head(x_TD[start : start + chunk_tokens])
            chunk_loss = loss_sum(logits_TV, labels_T[start : start + chunk_tokens])
            (chunk_loss / denominator).backward()
            micro_loss += chunk_loss.detach()
            del logits_TV, chunk_loss
    return micro_loss, x_TD.grad.view_as(x_BSD)


class FuyouSchedule:
    """Runs one optimizer step's forward, backward and optimizer hand-offs (module docstring).

    Args:
        model: the `Transformer`; its embedding/final norm/head parameters are resident on the
            compute device, its blocks are templates (on "meta") called with streamed weights.
        weights: the runtime's `BlockWeights` (fetch, release, views, offload_grads).
        optimizer: `offload.cpu_optimizer.OffloadedAdamW` with groups "block.{j}" and, unless
            `resident_outer` updates it on the device, "outer".
        make_activations: () -> a fresh `ActivationSwap` for one micro-batch.
        recompute_inputs: activations "none": keep only x_0 and recompute x_j in backward from it.
        device: the compute device.
        bf16: run blocks and head under bf16 autocast, as the reference does.
        prefetch_depth: d.
        compile_blocks: run every block (forward, recompute, backward) through one torch.compile'd
            function of x and the block's flat weight parts (fuyou.block_compile).
        resident_outer: an `offload.resident_optimizer.ResidentAdamW` that updates the outer group on the
            compute device once the clip factor is known (offload.outer_optimizer "gpu"), or None.
    """

    def __init__(self, model, weights, optimizer, make_activations: Callable[[], ActivationSwap], *,
                 recompute_inputs: bool, device: torch.device, bf16: bool, prefetch_depth: int,
                 compile_blocks: bool = False, resident_outer=None) -> None:
        self.model, self.weights, self.optimizer, self.resident_outer = model, weights, optimizer, resident_outer
        self._outer_sumsq = 0.0  # the resident outer group's squared gradient norm, this step
        self._outer_key = "outer" if resident_outer is None else None  # the CPU optimizer's outer group, if it has one
        self.make_activations, self.recompute_inputs = make_activations, recompute_inputs
        self.device, self.bf16, self.depth = device, bf16, prefetch_depth
        self.num_layers = len(model.blocks)
        self.outer_parameters = [p for name, p in model.named_parameters() if not name.startswith("blocks.")]
        self.tracer = None  # a profiler's fuyou.timeline.ComputeTracer; None: spans cost nothing
        self.compiled_block = None
        if compile_blocks:
            # One graph for all L blocks: their flat layouts are the same, only the values passed in differ.
            assert all(layouts == weights.layouts[0] for layouts in weights.layouts), "blocks differ in shape"
            self.compiled_block = flat_block_function(model.blocks[0], weights.layouts[0])

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def _span(self, kind: str, j: int | None):
        return nullcontext() if self.tracer is None else self.tracer.span(kind, j)

    def _stream(self, order: Sequence[int]) -> WeightStream:
        return WeightStream(order, self.weights.fetch, self.weights.release, self.depth, self.weights.take)

    def _block(self, j: int, parts: list[torch.Tensor], x_BSD: torch.Tensor, *, output_unused: bool = False) -> torch.Tensor:
        """Block j on x_BSD with its streamed weights; `output_unused`: only for backprop (Block.forward)."""
        with self.autocast():
            if self.compiled_block is not None:
                return self.compiled_block(x_BSD, *parts, output_unused=output_unused)
            return functional_call(self.model.blocks[j], self.weights.views(j, parts), (x_BSD,),
                                   {"output_unused": output_unused})

    # ---- one step ------------------------------------------------------------------------------

    def step(self, micro_batches, *, lr: float, max_grad_norm: float | None, speculate: bool) -> tuple[float, float, float]:
        """Forward, backward and the optimizer hand-offs of one step.

        Returns:
            (loss sum over all target tokens, unclipped global gradient norm, clip factor c).
        """
        L, K = self.num_layers, len(micro_batches)
        denominator = max(1, sum(batch.num_target_tokens for batch in micro_batches))
        total_loss = torch.zeros((), device=self.device)
        for k, batch in enumerate(micro_batches):
            input_ids_BS = batch.input_ids.to(self.device)
            labels_BS = batch.labels.to(self.device)
            last = k == K - 1
            activations = self.make_activations()
            x_BSD = self._forward(input_ids_BS, activations)
            # backward's prologue: its first weights and x_{L-1} move while the head computes
            backward_weights = self._backward_prologue(activations)
            with self._span("head", None):
                micro_loss, grad_BSD = head_loss_backward(self.model.head, x_BSD, labels_BS, denominator,
                                                          autocast=self.autocast, chunk_tokens=HEAD_CHUNK_TOKENS)
            del x_BSD
            total_loss += micro_loss
            self._backward(input_ids_BS, grad_BSD, activations, backward_weights, first=k == 0, last=last,
                           update_now=last and speculate, lr=lr)

        wait_for_device(self.device)  # the loss's read must not hold the GIL while backward finishes
        total_loss = total_loss.item()
        grad_norm = math.sqrt(self.optimizer.grad_sumsq() + self._outer_sumsq)
        clip = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (grad_norm + 1e-6))
        if self.resident_outer is not None:
            # Exact at once (the clip is known): a few ms on the device, ahead of the next forward's embedding.
            self.resident_outer.update(lr=lr, clip=clip)
        # Forward order, so the next step's forward of block j waits only for block j's update.
        order = ([self._outer_key] if self._outer_key else []) + [f"block.{j}" for j in range(L)]
        for index, key in enumerate(order):
            next_key = order[index + 1] if index + 1 < len(order) else None
            if not speculate:
                self.optimizer.update(key, lr=lr, clip=clip, next_key=next_key)
            elif clip < 1.0:
                self.optimizer.fix_up(key, lr=lr, clip=clip, next_key=next_key)
        self.optimizer.end_step()
        return total_loss, grad_norm, clip

    # ---- forward of micro-batch k ---------------------------------------------------------------

    def _forward(self, input_ids_BS, activations: ActivationSwap) -> torch.Tensor:
        """The blocks' forward (no graph); returns x_L, the head's input."""
        L = self.num_layers
        with torch.no_grad():
            # prologue: the first d blocks' weights start moving (each once its update is done) while
            # the embedding and head wait for theirs (through the CPU optimizer) and the embedding runs
            weights = self._stream(range(L))
            if self.resident_outer is None:
                self.optimizer.ready("outer").result()
            with self.autocast():
                x_BSD = self.model.embed(input_ids_BS)
            # steady state: load weights j+d | save x_j | compute block j | free weights j
            for _ in range(L):
                j, parts = weights.next()
                if j == 0 or not self.recompute_inputs:
                    activations.save(j, x_BSD)
                with self._span("forward", j):
                    x_BSD = self._block(j, parts, x_BSD)
                weights.release(j, parts)
        # epilogue (step()): backward's prologue, then the head and loss in chunks of HEAD_CHUNK_TOKENS tokens
        return x_BSD

    # ---- backward of micro-batch k ----------------------------------------------------------------

    def _backward_prologue(self, activations: ActivationSwap) -> WeightStream:
        """Start moving backward's first weights (L-1..L-d) and x_{L-1}; returns backward's weight stream."""
        L = self.num_layers
        # Visit order of weights: each block once, in reverse; with recomputed inputs, block j's
        # input is first rebuilt from x_0 through blocks 0..j-1 (L(L-1)/2 extra block forwards).
        order = []
        for j in reversed(range(L)):
            order += (list(range(j)) if self.recompute_inputs else []) + [j]
        weights = self._stream(order)
        activations.prefetch(L - 1)
        return weights

    def _backward(self, input_ids_BS, grad_BSD, activations: ActivationSwap, weights: WeightStream, *, first: bool,
                  last: bool, update_now: bool, lr: float) -> None:
        L = self.num_layers
        # steady state: load weights j-d | load x_{j-1} | recompute and backprop block j | free weights j |
        # gradient of j -> CPU (and, on the last micro-batch, block j's update on the CPU)
        for j in reversed(range(L)):
            activations.prefetch(j - 1)
            x_in_BSD = self._rebuild_input(j, weights, activations)
            visited, parts = weights.next()
            assert visited == j
            x_leaf_BSD = x_in_BSD.detach().requires_grad_()
            leaves = [part.detach().requires_grad_() for part in parts]
            with torch.enable_grad(), self._span("backward", j):
                # y's values are never read, only differentiated: the last linear's GEMM is skipped
                y_BSD = self._block(j, leaves, x_leaf_BSD, output_unused=True)
                grad_in_BSD, *grad_parts = torch.autograd.grad(y_BSD, [x_leaf_BSD, *leaves], grad_BSD)
            del y_BSD, leaves, x_leaf_BSD
            weights.release(j, parts)
            if not self.recompute_inputs:
                activations.drop(j, x_in_BSD)
            self.weights.offload_grads(f"block.{j}", grad_parts, first=first, last=last)
            if update_now:
                self.optimizer.update(f"block.{j}", lr=lr, next_key=f"block.{j - 1}" if j > 0 else self._outer_key)
            grad_BSD = grad_in_BSD
        # epilogue: through the embedding; the resident parameters' gradients go to the CPU once per step
        with self.autocast():
            x0_BSD = self.model.embed(input_ids_BS)
        x0_BSD.backward(grad_BSD)
        if self.recompute_inputs:
            activations.drop(0, activations.load(0))
        if last:
            if self.resident_outer is not None:
                self._outer_sumsq = self.resident_outer.take_gradients(self.weights.take_outer_grads(self.outer_parameters))
            else:
                self.weights.offload_outer_grads(self.outer_parameters)
            if update_now:
                # Read ahead: block L-1 is the next step's first update; its state (if on SSD) streams
                # in during that step's forward instead of after its first backward block.
                if self.resident_outer is not None:
                    self.optimizer.read_ahead(f"block.{L - 1}")
                else:
                    self.optimizer.update("outer", lr=lr, next_key=f"block.{L - 1}")

    def _rebuild_input(self, j: int, weights: WeightStream, activations: ActivationSwap) -> torch.Tensor:
        """x_j: loaded from its checkpoint, or recomputed from x_0 (activations "none")."""
        if not self.recompute_inputs or j == 0:
            return activations.load(j)
        x_BSD = activations.load(0)
        with torch.no_grad():
            for _ in range(j):
                i, parts = weights.next()
                with self._span("recompute", i):
                    x_BSD = self._block(i, parts, x_BSD)
                weights.release(i, parts)
        return x_BSD
