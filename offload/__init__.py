"""offload: a tiered tensor store GPU <-> pinned CPU <-> SSD with asynchronous, pipelined moves.

It knows nothing of models or configs; it places and moves tensors. Modules, bottom up:
errors (OffloadError), budget (caps and peaks), pinned (aligned host buffer pool), futures,
ssd (the SSDBackend protocol; posix and kvikio backends), swapfile (preallocated, checksummed swap
file), streams (CUDA copy streams with event waiters), store (TieredStore and its one `copy()`).
"""

from offload.budget import GiB, Budget, cap_gpu_memory
from offload.errors import OffloadError
from offload.pinned import HostBuffer, PinnedPool
from offload.ssd import KvikioBackend, PosixBackend, SSDBackend, kvikio_importable, make_backend
from offload.store import SSDTensor, TieredStore, Tier, TraceEvent
from offload.swapfile import Extent, SwapFile

__all__ = [
    "Budget",
    "Extent",
    "GiB",
    "HostBuffer",
    "KvikioBackend",
    "OffloadError",
    "PinnedPool",
    "PosixBackend",
    "SSDBackend",
    "SSDTensor",
    "SwapFile",
    "Tier",
    "TieredStore",
    "TraceEvent",
    "cap_gpu_memory",
    "kvikio_importable",
    "make_backend",
]
