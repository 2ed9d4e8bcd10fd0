"""Memory budgets that emulate a consumer box (24 GB GPU, a few hundred GB of pinned RAM) on a bigger one.

Two mechanisms, because neither alone is enough:
- `cap_gpu_memory` sets torch's per-process memory fraction, a hard limit that covers everything the
  process allocates on the GPU (the model's activations included), so a plan that fits on an H100
  but not on an RTX 4090 fails here too. torch raises its own out-of-memory error past it.
- `Budget` is the store's own byte accounting (what the store placed on a tier), checked before the
  allocation is made, so the error names the store's tier and cap instead of a CUDA allocator dump.

Over the cap, `Budget.reserve` raises `OffloadError` rather than waiting: the store's explicit
allocations come from a single-threaded schedule, where waiting for memory that only the same
thread would free deadlocks. (Short-lived staging buffers wait instead; see `offload.pinned`.)
"""

from __future__ import annotations

import threading

from offload.errors import OffloadError

GiB = 1 << 30


def format_bytes(num_bytes: int) -> str:
    """Decimal units with one digit (GB above 1e9, MB, then kB), as disks and `df -H` count."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


class Budget:
    """Thread-safe byte accounting against a cap for one tier.

    Args:
        name: the tier's name in error messages, e.g. "pinned CPU".
        cap_bytes: the cap; None means unlimited (accounting and peak still kept).
    """

    def __init__(self, name: str, cap_bytes: int | None) -> None:
        self.name = name
        self.cap_bytes = cap_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        self._lock = threading.Lock()

    def can_reserve(self, num_bytes: int) -> bool:
        with self._lock:
            return self.cap_bytes is None or self.used_bytes + num_bytes <= self.cap_bytes

    def reserve(self, num_bytes: int, what: str = "tensor") -> None:
        """Count `num_bytes` as used.

        Raises:
            OffloadError: if the cap would be exceeded; nothing is counted then.
        """
        assert num_bytes >= 0
        with self._lock:
            if self.cap_bytes is not None and self.used_bytes + num_bytes > self.cap_bytes:
                raise OffloadError(
                    f"{self.name} budget exceeded: {what} needs {format_bytes(num_bytes)} with "
                    f"{format_bytes(self.used_bytes)} of {format_bytes(self.cap_bytes)} in use; "
                    f"raise the {self.name} cap or free tensors first"
                )
            self.used_bytes += num_bytes
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def release(self, num_bytes: int) -> None:
        with self._lock:
            assert num_bytes <= self.used_bytes, (num_bytes, self.used_bytes)
            self.used_bytes -= num_bytes

    def report(self) -> dict:
        return {"cap_bytes": self.cap_bytes, "used_bytes": self.used_bytes, "peak_bytes": self.peak_bytes}


def cap_gpu_memory(cap_bytes: int, device=None) -> float:
    """Limit this process's GPU memory to `cap_bytes` through torch's caching allocator.

    Args:
        cap_bytes: e.g. 24 * GiB to emulate an RTX 4090 on an H100.
        device: a CUDA device; the current one when None.

    Returns:
        The fraction of the device's total memory that was set.

    Raises:
        OffloadError: if the cap is larger than the device.
    """
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    total_bytes = torch.cuda.get_device_properties(device).total_memory
    if cap_bytes > total_bytes:
        raise OffloadError(
            f"GPU cap {format_bytes(cap_bytes)} is larger than the device's {format_bytes(total_bytes)}; "
            "lower the GPU cap"
        )
    fraction = cap_bytes / total_bytes
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def gpu_peak_bytes(device=None) -> int:
    """The most GPU memory torch's allocator has reserved in this process (all users, not only the store)."""
    import torch

    return torch.cuda.max_memory_reserved(device)
