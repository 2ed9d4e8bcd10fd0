"""The tiered tensor store: tensors placed on GPU, pinned CPU or SSD, moved by one `copy()`.

Every byte that moves between tiers, in any direction, goes through `TieredStore.copy(dst, src)`,
the choke point (cf. FlexGen's `general_copy`): so one optional trace shows all traffic, one
place orders conflicting moves, and one place chooses staging. A move is a chain of legs, each
leg one of:
- a memory copy (`h2d`, `d2h` on their own CUDA streams, `d2d`, `h2h` on a thread pool), see
  `offload.streams`;
- an SSD read or write of a whole padded extent (`ssd_read`, `ssd_write`), see `offload.swapfile`.
SSD <-> GPU goes through a pinned staging buffer unless the backend takes device buffers (kvikio)
and checksums are off; SSD <-> CPU goes straight into the CPU tensor when the store allocated it
(aligned and padded), else through staging.

Ordering invariant: a move waits for the moves issued before it that write its src (read after
write) or that read or write its dst (write after read, write after write), per tensor storage or
SSD extent; so a fetch issued after a write-back reads the new bytes, and a write-back never
overwrites bytes a fetch is still reading. Between CUDA copies the wait is on the GPU (the copy
stream waits on the earlier copies' events) and the move is issued at once; otherwise the host
issues it when the moves it waits for are done. Moves that only read the same source run concurrently,
and so do moves on different tensors. Work the caller issued on its current CUDA stream
before `copy()` is finished before the copy reads or overwrites GPU memory.

Named layer (for the runtime's per-block parameters, gradients, optimizer state, activations):
`put` gives a name a home on a tier, `fetch` makes a working copy on another tier ahead of use,
`write_back` copies a working tensor home behind compute. All return futures.

Legend: `*_u8` is a flat uint8 view of a tensor's bytes.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from offload.budget import Budget, cap_gpu_memory, gpu_peak_bytes
from offload.errors import OffloadError
from offload.futures import completed, finally_, gather, then
from offload.pinned import HostBuffer, PinnedPool, round_up
from offload.ssd import make_backend
from offload.streams import CopyEngine
from offload.swapfile import Extent, SwapFile


class Tier(str, enum.Enum):
    GPU = "gpu"
    CPU = "cpu"
    SSD = "ssd"


@dataclass(eq=False)
class SSDTensor:
    """A tensor whose bytes live in an extent of the store's swap file."""

    extent: Extent
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.extent.num_bytes


@dataclass(frozen=True)
class TraceEvent:
    """One leg of one move: from issue to completion, seconds since the store was created."""

    kind: str  # h2d, d2h, d2d, h2h, ssd_read, ssd_write
    start_s: float
    end_s: float
    num_bytes: int


def _as_u8(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _key(x) -> tuple:
    if isinstance(x, SSDTensor):
        return ("ssd", x.extent.file_offset)
    return ("mem", x.device.type, x.untyped_storage().data_ptr())


class TieredStore:
    """GPU <-> pinned CPU <-> SSD tensor store with asynchronous moves.

    Args:
        ssd_dir: directory for the swap file; None: no SSD tier.
        ssd_num_bytes: swap file size, preallocated at construction.
        cpu_cap_bytes: cap on the pinned pool (working copies and staging buffers together).
        gpu_cap_bytes: cap on this process's GPU memory (torch's memory fraction, all users) and
            on the store's own GPU tensors (its accounting).
        device: CUDA device; default "cuda" when available, else none (CPU-only machine).
        backend: "auto", "posix" or "kvikio" (see `offload.ssd`).
        num_io_threads: SSD threads (posix) or kvikio's pool size: the disk's queue depth.
        io_chunk_bytes: how large requests are split among I/O threads.
        checksum: verify every SSD read against a checksum taken at write (see `offload.swapfile`).
        trace: record a `TraceEvent` per leg in `self.trace` (setting `self.trace = []` later starts it).

    Raises:
        OffloadError: the swap file does not fit under `ssd_dir`, or the GPU cap exceeds the device.
    """

    def __init__(
        self,
        *,
        ssd_dir: str | None = None,
        ssd_num_bytes: int = 0,
        cpu_cap_bytes: int | None = None,
        gpu_cap_bytes: int | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
        num_io_threads: int = 8,
        io_chunk_bytes: int = 8 << 20,
        checksum: bool = False,
        trace: bool = False,
    ) -> None:
        if device is None and torch.cuda.is_available():
            device = "cuda"
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if gpu_cap_bytes is not None and self.device is not None:
            cap_gpu_memory(gpu_cap_bytes, self.device)
        self.gpu_budget = Budget("GPU", gpu_cap_bytes)
        self.ssd_budget = Budget("SSD", ssd_num_bytes if ssd_dir else 0)
        self.pool = PinnedPool(cpu_cap_bytes, pin=self.device is not None)
        self.copies = CopyEngine(self.device)
        self.checksum = checksum
        self.swap: SwapFile | None = None
        self.backend = None
        if ssd_dir is not None:
            self.backend = make_backend(backend, num_threads=num_io_threads, chunk_bytes=io_chunk_bytes)
            try:
                self.swap = SwapFile(ssd_dir, ssd_num_bytes, self.backend, checksum=checksum)
            except BaseException:
                self.backend.shutdown()
                raise
        self.trace: list[TraceEvent] | None = [] if trace else None
        self._t0 = time.perf_counter()
        # Bytes of the legs started so far, per kind (h2d, d2h, ..., ssd_write): cheap enough to keep
        # always, so a run's summary can say what it moved without the trace.
        self.moved_bytes: dict[str, int] = collections.Counter()
        self._moved_lock = threading.Lock()
        self._lock = threading.RLock()  # re-entered when a callback runs inline
        # Per storage or extent: the move that last writes it, and the moves reading it since.
        self._writer: dict[tuple, Future] = {}
        self._readers: dict[tuple, list[Future]] = {}
        self._host_owned: dict[int, HostBuffer] = {}  # data_ptr -> pool buffer behind a CPU tensor
        self._gpu_owned: dict[int, int] = {}  # data_ptr -> padded bytes of a GPU tensor
        self._homes: dict[str, torch.Tensor | SSDTensor] = {}
        self._closed = False

    # ---- allocation on a tier ------------------------------------------------------------------

    def empty(self, shape, dtype: torch.dtype, tier: Tier | str):
        """An uninitialized tensor on `tier`, counted against that tier's budget.

        GPU and CPU tensors are allocated padded to 4096 bytes (CPU ones 4096-aligned, from the
        pinned pool), so they move to and from SSD without staging.

        Returns:
            torch.Tensor (GPU, CPU) or SSDTensor (SSD).

        Raises:
            OffloadError: over the tier's cap, or a tier this store does not have.
        """
        tier, shape = Tier(tier), torch.Size(shape)
        num_bytes = shape.numel() * dtype.itemsize
        capacity_bytes = round_up(max(num_bytes, 1))
        if tier is Tier.SSD:
            if self.swap is None:
                raise OffloadError("this store has no SSD tier; pass ssd_dir and ssd_num_bytes")
            self.ssd_budget.reserve(capacity_bytes, "SSD tensor")
            try:
                return SSDTensor(self.swap.allocate(num_bytes), shape, dtype)
            except BaseException:
                self.ssd_budget.release(capacity_bytes)
                raise
        if tier is Tier.CPU:
            buffer = self.pool.acquire(num_bytes, what=f"CPU tensor {tuple(shape)} {dtype}")
            tensor = buffer.view(num_bytes).view(dtype).view(shape)
            with self._lock:
                self._host_owned[tensor.data_ptr()] = buffer
            return tensor
        if self.device is None:
            raise OffloadError("this store has no GPU tier on a machine without CUDA; place tensors on cpu or ssd")
        self.gpu_budget.reserve(capacity_bytes, f"GPU tensor {tuple(shape)} {dtype}")
        tensor = torch.empty(capacity_bytes, dtype=torch.uint8, device=self.device)[:num_bytes].view(dtype).view(shape)
        with self._lock:
            self._gpu_owned[tensor.data_ptr()] = capacity_bytes
        return tensor

    def free(self, x) -> Future:
        """Give back a tensor from `empty`, once the moves already issued on it are done.

        The caller must not use `x` afterwards: a CPU tensor's memory goes back to the pool.

        Returns:
            A future done once the memory is back (so a caller that waits on it can reuse the pool's
            buffer instead of growing the pool); it carries no error of the moves it waited for.
        """
        pending = self._pending(_key(x))
        if not pending:
            self._release(x)
            return completed()
        released: Future = Future()

        def release(_: Future) -> None:
            try:
                self._release(x)
            finally:
                released.set_result(None)

        gather(pending).add_done_callback(release)
        return released

    def _release(self, x) -> None:
        if isinstance(x, SSDTensor):
            self.swap.free(x.extent)
            self.ssd_budget.release(x.extent.capacity_bytes)
            return
        with self._lock:
            buffer = self._host_owned.pop(x.data_ptr(), None)
            capacity_bytes = self._gpu_owned.pop(x.data_ptr(), None)
        assert buffer is not None or capacity_bytes is not None, "free() of a tensor the store did not allocate"
        if buffer is not None:
            self.pool.release(buffer)
        else:
            self.gpu_budget.release(capacity_bytes)

    # ---- the choke point -----------------------------------------------------------------------

    def copy(self, dst, src) -> Future:
        """Copy `src` into `dst`, each a torch.Tensor (CPU or GPU) or an SSDTensor.

        Both must be contiguous with the same shape and dtype; the bytes arrive bit-exact.

        Returns:
            A future whose result is `dst`, done once the bytes are in `dst` (and, with checksums
            on, verified). Errors (I/O, checksum) are raised from `.result()`.

        Raises:
            OffloadError: mismatched or non-contiguous tensors.
        """
        for x in (dst, src):
            if isinstance(x, torch.Tensor) and not x.is_contiguous():
                raise OffloadError("copy() needs contiguous tensors; call .contiguous() first")
        if (tuple(dst.shape), dst.dtype) != (tuple(src.shape), src.dtype):
            raise OffloadError(
                f"copy() from {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} {dst.dtype}; shapes and dtypes must match"
            )
        assert not self._closed, "copy() on a closed store"
        ready = self.copies.producer_event() if any(_on_gpu(x) for x in (dst, src)) else None
        staging = self._staging_for(dst, src)
        dst_key, src_key = _key(dst), _key(src)
        with self._lock:
            # Read after write on src; write after write and write after read on dst.
            previous = [f for f in (self._writer.get(src_key), self._writer.get(dst_key)) if f is not None]
            previous += self._readers.get(dst_key, [])
            events = [getattr(f, "cuda_event", None) for f in previous]
            if previous and ready is not None and staging is None and not _on_ssd(dst, src) and None not in events:
                # Every earlier move it must follow is a CUDA copy already issued: order it after them
                # on the GPU (their events) and issue now, instead of from the host once they are done.
                # That saves a waiter wake-up and a Python re-issue per move, which cost small moves
                # (16 MiB: 0.3 ms on the link) up to half the link (issue-3 table).
                move = _call(lambda: self._memory_leg(_as_u8(dst), _as_u8(src), [ready, *events]))
            else:
                start = lambda: self._start(dst, src, staging, ready)  # noqa: E731
                move = then(gather(previous), start) if previous else _call(start)
            if staging is not None:
                move = finally_(move, lambda: self.pool.release(staging))
            self._writer[dst_key] = move
            self._readers[dst_key] = []
            if src_key != dst_key:
                self._readers.setdefault(src_key, []).append(move)
        # The callback gets the move as its argument: capturing `move` would make a reference cycle
        # that keeps dst/src tensors alive until the cyclic GC runs.
        move.add_done_callback(lambda done: self._forget(dst_key, src_key, done))
        out: Future = Future()
        move.add_done_callback(lambda done: out.set_exception(done.exception()) if done.exception() else out.set_result(dst))
        return out

    def _pending(self, key: tuple) -> list[Future]:
        with self._lock:
            writer = self._writer.get(key)
            return ([writer] if writer is not None else []) + list(self._readers.get(key, []))

    def _forget(self, dst_key: tuple, src_key: tuple, move: Future) -> None:
        with self._lock:
            if self._writer.get(dst_key) is move:
                del self._writer[dst_key]
            readers = self._readers.get(src_key)
            if readers is not None and move in readers:
                readers.remove(move)
            for key in (dst_key, src_key):
                if not self._readers.get(key, True):
                    del self._readers[key]

    def _direct_u8(self, x, capacity_bytes: int) -> torch.Tensor | None:
        """`x`'s bytes padded to `capacity_bytes`, if the SSD backend can use its memory directly."""
        if x.is_cuda:
            if not (self.backend.accepts_device_buffers and not self.checksum):
                return None
            padded_bytes = self._gpu_owned.get(x.data_ptr(), x.nbytes)
            if padded_bytes < capacity_bytes:
                return None
            # Reading past the tensor's own bytes into its padding, which `empty` allocated.
            return torch.empty(0, dtype=torch.uint8, device=x.device).set_(
                x.untyped_storage(), x.storage_offset() * x.element_size(), (capacity_bytes,)
            )
        buffer = self._host_owned.get(x.data_ptr())
        return None if buffer is None or buffer.capacity_bytes < capacity_bytes else buffer.view(capacity_bytes)

    def _staging_for(self, dst, src) -> HostBuffer | None:
        ssd = dst if isinstance(dst, SSDTensor) else src if isinstance(src, SSDTensor) else None
        if ssd is None:
            return None
        other = src if ssd is dst else dst
        if isinstance(other, torch.Tensor) and self._direct_u8(other, ssd.extent.capacity_bytes) is not None:
            return None
        # Waits (rather than raising) while other moves' staging buffers are out: they come back.
        return self.pool.acquire(ssd.extent.capacity_bytes, wait=True, what="staging buffer")

    def _start(self, dst, src, staging: HostBuffer | None, ready) -> Future:
        """Issue the legs of one move (all its dependencies are done)."""
        if isinstance(src, SSDTensor) and isinstance(dst, SSDTensor):
            extent = src.extent
            read = self._ssd_leg("ssd_read", self.swap.read, extent, staging.view(extent.capacity_bytes))
            return then(read, lambda: self._ssd_leg("ssd_write", self.swap.write, dst.extent, staging.view(extent.capacity_bytes)))
        if isinstance(dst, SSDTensor):
            extent = dst.extent
            direct = self._direct_u8(src, extent.capacity_bytes)
            if direct is not None:
                before = self.copies.wait_event(ready) if src.is_cuda else completed()
                return then(before, lambda: self._ssd_leg("ssd_write", self.swap.write, extent, direct))
            to_staging = self._memory_leg(staging.view(extent.num_bytes), _as_u8(src), ready)
            return then(to_staging, lambda: self._ssd_leg("ssd_write", self.swap.write, extent, staging.view(extent.capacity_bytes)))
        if isinstance(src, SSDTensor):
            extent = src.extent
            direct = self._direct_u8(dst, extent.capacity_bytes)
            if direct is not None:
                before = self.copies.wait_event(ready) if dst.is_cuda else completed()
                return then(before, lambda: self._ssd_leg("ssd_read", self.swap.read, extent, direct))
            read = self._ssd_leg("ssd_read", self.swap.read, extent, staging.view(extent.capacity_bytes))
            return then(read, lambda: self._memory_leg(_as_u8(dst), staging.view(extent.num_bytes), ready))
        return self._memory_leg(_as_u8(dst), _as_u8(src), ready)

    def _memory_leg(self, dst_u8: torch.Tensor, src_u8: torch.Tensor, ready) -> Future:
        start_s = time.perf_counter()
        kind, future = self.copies.copy(dst_u8, src_u8, ready)
        return self._traced(kind, start_s, src_u8.numel(), future)

    def _ssd_leg(self, kind: str, io, extent: Extent, buffer_u8: torch.Tensor) -> Future:
        start_s = time.perf_counter()
        return self._traced(kind, start_s, extent.capacity_bytes, io(extent, buffer_u8))

    def _traced(self, kind: str, start_s: float, num_bytes: int, future: Future) -> Future:
        with self._moved_lock:
            self.moved_bytes[kind] += num_bytes
        if self.trace is not None:

            def record(_: Future) -> None:
                event = TraceEvent(kind, start_s - self._t0, time.perf_counter() - self._t0, num_bytes)
                self.trace.append(event)  # list.append is atomic under the GIL

            future.add_done_callback(record)
        return future

    @property
    def trace_origin_s(self) -> float:
        """The `time.perf_counter()` value that `TraceEvent` times count from."""
        return self._t0

    # ---- named tensors -------------------------------------------------------------------------

    def put(self, name: str, tensor: torch.Tensor, tier: Tier | str) -> Future:
        """Give `name` a home on `tier` holding a copy of `tensor`; result: the home."""
        if name in self._homes:
            raise OffloadError(f"tensor {name!r} is already in the store; delete() it first or pick another name")
        home = self.empty(tensor.shape, tensor.dtype, tier)
        self._homes[name] = home
        return self.copy(home, tensor.contiguous())

    def adopt(self, name: str, tensor: torch.Tensor) -> None:
        """Make `tensor`, a CPU or GPU tensor from `empty()`, the home of `name` (no copy).

        For a caller that builds a large state in place (the optimizer's masters and moments): `put`
        would hold it twice, once in the caller's tensor and once in the home.
        """
        if name in self._homes:
            raise OffloadError(f"tensor {name!r} is already in the store; delete() it first or pick another name")
        assert tensor.data_ptr() in self._host_owned or tensor.data_ptr() in self._gpu_owned, "adopt() of a tensor the store did not allocate"
        self._homes[name] = tensor

    def home(self, name: str):
        """The home tensor (torch.Tensor or SSDTensor) of `name`."""
        if name not in self._homes:
            raise OffloadError(f"no tensor named {name!r} in the store; put() it first")
        return self._homes[name]

    def settled(self, name: str) -> torch.Tensor:
        """`name`'s home (a CPU or GPU tensor) once every move issued on it is done.

        For a caller that writes the home in place itself (the runtime's cast of updated weights
        into their CPU home): no move may still be reading or writing those bytes.
        """
        home = self.home(name)
        if isinstance(home, SSDTensor):
            raise OffloadError(f"{name!r} lives on the SSD; write it with write_back()")
        for future in self._pending(_key(home)):
            future.result()
        return home

    def fetch(self, name: str, tier: Tier | str) -> Future:
        """Start copying `name` into a new working tensor on `tier`; result: that tensor.

        Give the working tensor back with `free()` when done with it.
        """
        home = self.home(name)
        work = self.empty(home.shape, home.dtype, tier)
        return self.copy(work, home)

    def write_back(self, name: str, tensor: torch.Tensor) -> Future:
        """Start copying `tensor` (e.g. an updated working copy) into `name`'s home."""
        return self.copy(self.home(name), tensor)

    def delete(self, name: str) -> None:
        """Drop `name` and free its home once pending moves on it are done."""
        self.free(self._homes.pop(name))

    # ---- reports and lifetime ------------------------------------------------------------------

    def synchronize(self) -> None:
        """Wait for every move issued so far; raises the first error among them."""
        for future in self._all_pending():
            future.result()

    def _all_pending(self) -> list[Future]:
        with self._lock:
            pending = set(self._writer.values())
            for readers in self._readers.values():
                pending.update(readers)
        return list(pending)

    def report(self) -> dict:
        """Used and peak bytes per tier against the caps."""
        report = {"cpu_pinned": self.pool.report(), "gpu_store": self.gpu_budget.report(), "ssd": self.ssd_budget.report()}
        if self.device is not None:
            report["gpu_process_peak_reserved_bytes"] = gpu_peak_bytes(self.device)
        return report

    def close(self) -> None:
        """Finish pending moves (errors are left to their futures), remove the swap file, free the pools."""
        if self._closed:
            return
        self._closed = True
        for future in self._all_pending():
            future.exception()  # waits; the error was or will be seen by whoever holds the future
        self.copies.close()
        if self.swap is not None:
            self.swap.close()
            self.backend.shutdown()
        self._homes.clear()
        self._host_owned.clear()
        self.pool.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _on_gpu(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_cuda


def _on_ssd(*xs) -> bool:
    return any(isinstance(x, SSDTensor) for x in xs)


def _call(start) -> Future:
    try:
        return start()
    except BaseException as error:  # noqa: BLE001 - delivered through the future like later failures
        failed: Future = Future()
        failed.set_exception(error)
        return failed
