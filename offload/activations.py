"""Checkpointed activations of one micro-batch: kept where they were computed, or swapped out and back.

With per-block checkpointing the only activation kept between forward and backward is each block's
input x_j; backward recomputes the block from it. This class holds those inputs for one micro-batch:
- `keep=True`: the tensor stays on the compute device (no copy);
- otherwise it is written to `tier` (pinned CPU or SSD) through the store as soon as it is saved,
  behind compute, and read back to the compute tier ahead of use (`prefetch(j)` is issued while
  block j+1 is computing in backward, which visits blocks in reverse order).
Keys are the block index j; the runtime names the legend.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from offload.store import Tier, TieredStore


class ActivationSwap:
    """Saved block inputs x_j of one micro-batch.

    Args:
        store: every swap goes through its `copy()` (via put/fetch).
        tier: where swapped inputs live ("cpu" or "ssd"); ignored with `keep`.
        compute_tier: where compute reads them (GPU, or CPU on a machine without one).
        keep: leave inputs on the compute device instead of swapping.
    """

    def __init__(self, store: TieredStore, tier: Tier | str, compute_tier: Tier | str, *, keep: bool) -> None:
        self.store, self.tier, self.compute_tier, self.keep = store, Tier(tier), Tier(compute_tier), keep
        self._kept: dict[int, torch.Tensor] = {}
        self._loading: dict[int, Future] = {}

    def _name(self, j: int) -> str:
        return f"activation.{j}"

    def save(self, j: int, x_BSD: torch.Tensor) -> None:
        """Keep or start swapping out block j's input (the caller must not modify `x_BSD` afterwards)."""
        if self.keep:
            self._kept[j] = x_BSD
        else:
            self.store.put(self._name(j), x_BSD.contiguous(), self.tier)

    def prefetch(self, j: int) -> None:
        """Start bringing block j's input back to the compute tier (no-op if kept or already loading)."""
        if j < 0 or self.keep or j in self._loading:
            return
        self._loading[j] = self.store.fetch(self._name(j), self.compute_tier)

    def load(self, j: int) -> torch.Tensor:
        """Block j's input on the compute tier (waits for its swap-in)."""
        if self.keep:
            return self._kept[j]
        self.prefetch(j)
        return self._loading[j].result()

    def drop(self, j: int, x_BSD: torch.Tensor) -> None:
        """Forget block j's input once backward is done with `x_BSD` (the tensor `load(j)` returned)."""
        if self.keep:
            del self._kept[j]
            return
        del self._loading[j]
        self.store.free(x_BSD)
        self.store.delete(self._name(j))
