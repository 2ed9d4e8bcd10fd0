"""A pool of page-locked host buffers, aligned for O_DIRECT and reused rather than reallocated.

Why hand-written: torch's pinned allocator (`torch.empty(..., pin_memory=True)`) rounds every
request up to a power of two and keeps freed blocks in its own cache, so the pinned bytes a budget
sees would be up to 2x what was asked and never shrink. Here a buffer is plain host memory
over-allocated by one alignment unit, sliced to a 4096-byte-aligned start (O_DIRECT needs aligned
addresses, sizes and offsets), and registered with `cudaHostRegister`, which pins exactly those
pages. On a machine without CUDA nothing can be pinned: the buffers are the same aligned memory,
unpinned, so O_DIRECT and every code path above still run in CI.

Pages stay registered for as long as the pool holds a buffer, and the pool holds every buffer it
made until `close()` (or its finalizer) unregisters them all: memory freed while still registered
would make the next registration of the same addresses fail ("already mapped").

Freed buffers go back to free lists keyed by capacity; a request takes the smallest free buffer
of at least its size and at most 1/8 larger, so a steady-state schedule that asks for the same
block sizes every step allocates nothing after the first step. Free buffers are counted in the
budget (they are still pinned memory) and are dropped, largest first, only when a new allocation
would not fit under the cap otherwise.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from offload.budget import Budget, format_bytes
from offload.errors import OffloadError

ALIGN_BYTES = 4096  # O_DIRECT alignment that covers 512-byte and 4K-sector devices alike


def round_up(num_bytes: int, multiple: int = ALIGN_BYTES) -> int:
    return -(-num_bytes // multiple) * multiple


@dataclass(eq=False)
class HostBuffer:
    """One aligned host buffer.

    Attributes:
        data: uint8 CPU tensor of `capacity_bytes`, start address a multiple of 4096.
        capacity_bytes: a multiple of 4096, at least what was asked.
        pinned: whether the pages are registered with CUDA.
        waitable: acquired by a move that releases it on completion (see `PinnedPool.acquire`).
    """

    data: torch.Tensor
    capacity_bytes: int
    pinned: bool
    waitable: bool = False
    _backing: torch.Tensor | None = field(default=None, repr=False)

    def view(self, num_bytes: int) -> torch.Tensor:
        """The first `num_bytes` as a uint8 tensor."""
        return self.data[:num_bytes]


def _cuda_host_register(tensor: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
    if int(error) != 0:
        cudart.cudaGetLastError()  # clear it, or torch reports it at its next unrelated CUDA call
        raise OffloadError(
            f"cudaHostRegister of {format_bytes(tensor.numel())} failed with CUDA error {int(error)}; "
            "lower the CPU cap, or raise the locked-memory limit (ulimit -l)"
        )


def _cuda_host_unregister(tensor: torch.Tensor) -> None:
    error = torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    assert int(error) == 0, f"cudaHostUnregister failed: {error}"


class PinnedPool:
    """Aligned (and, with CUDA, pinned) host buffers under a byte cap.

    Args:
        cap_bytes: the most host memory the pool may hold, free buffers included; None: no cap.
        pin: register buffers with CUDA; default: whether CUDA is available.
    """

    def __init__(self, cap_bytes: int | None = None, *, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.budget = Budget("pinned CPU", cap_bytes)
        self.num_allocations = 0  # grows only when no free buffer fits: a check that reuse works
        self._free: list[HostBuffer] = []
        self._all: list[HostBuffer] = []  # out and free: unregistered together at close
        self._finalizer = weakref.finalize(self, _drop_all, self._all)
        self._num_waitable_in_use = 0
        self._cond = threading.Condition()

    def acquire(self, num_bytes: int, *, wait: bool = False, what: str = "host buffer") -> HostBuffer:
        """A buffer of at least `num_bytes` (rounded up to 4096).

        Args:
            num_bytes: bytes needed, > 0.
            wait: when the cap is reached, wait for buffers that in-flight moves will release
                (staging buffers) instead of raising. Raises all the same when no such buffer is
                out, since then nothing would ever be released.

        Raises:
            OffloadError: over the cap (and nothing to wait for).
        """
        capacity_bytes = round_up(max(num_bytes, 1))
        with self._cond:
            while True:
                buffer = self._take_free(capacity_bytes)
                if buffer is None:
                    buffer = self._allocate(capacity_bytes, what, raise_if_full=not (wait and self._num_waitable_in_use))
                if buffer is not None:
                    break
                self._cond.wait()
            buffer.waitable = wait
            self._num_waitable_in_use += wait
            return buffer

    def release(self, buffer: HostBuffer) -> None:
        """Give a buffer back for reuse; the caller must no longer touch it (no move in flight)."""
        with self._cond:
            self._num_waitable_in_use -= buffer.waitable
            buffer.waitable = False
            self._free.append(buffer)
            self._cond.notify_all()

    def close(self) -> None:
        """Unpin and drop every buffer, free or out; tensors still viewing one keep plain host memory."""
        with self._cond:
            self._free.clear()
            for buffer in self._all:
                self.budget.release(buffer.capacity_bytes)
            self._finalizer()

    def report(self) -> dict:
        return {**self.budget.report(), "num_allocations": self.num_allocations, "pinned": self.pin}

    def _take_free(self, capacity_bytes: int) -> HostBuffer | None:
        fitting = [b for b in self._free if capacity_bytes <= b.capacity_bytes <= capacity_bytes * 9 // 8]
        if not fitting:
            return None
        best = min(fitting, key=lambda b: b.capacity_bytes)
        self._free.remove(best)
        return best

    def _allocate(self, capacity_bytes: int, what: str, raise_if_full: bool) -> HostBuffer | None:
        # Drop free buffers of other sizes, largest first, until the new one fits under the cap.
        self._free.sort(key=lambda b: b.capacity_bytes)
        while not self.budget.can_reserve(capacity_bytes) and self._free:
            self._drop(self._free.pop())
        if not self.budget.can_reserve(capacity_bytes):
            if not raise_if_full:
                return None
            if self.budget.cap_bytes is not None and capacity_bytes > self.budget.cap_bytes:
                raise OffloadError(
                    f"{what} of {format_bytes(capacity_bytes)} is larger than the whole pinned CPU cap "
                    f"{format_bytes(self.budget.cap_bytes)}; raise the CPU cap or split the tensor"
                )
        self.budget.reserve(capacity_bytes, what)
        backing = torch.empty(capacity_bytes + ALIGN_BYTES, dtype=torch.uint8)
        skip_bytes = -backing.data_ptr() % ALIGN_BYTES
        data = backing[skip_bytes : skip_bytes + capacity_bytes]
        if self.pin:
            _cuda_host_register(data)
        self.num_allocations += 1
        buffer = HostBuffer(data=data, capacity_bytes=capacity_bytes, pinned=self.pin, _backing=backing)
        self._all.append(buffer)
        return buffer

    def _drop(self, buffer: HostBuffer) -> None:
        self._all.remove(buffer)
        _unpin(buffer)
        self.budget.release(buffer.capacity_bytes)


def _unpin(buffer: HostBuffer) -> None:
    if buffer.pinned:
        _cuda_host_unregister(buffer.data)
        buffer.pinned = False
    buffer.data = buffer._backing = None


def _drop_all(buffers: list[HostBuffer]) -> None:
    # Module-level so that the pool's finalizer holds no reference to the pool.
    while buffers:
        _unpin(buffers.pop())
