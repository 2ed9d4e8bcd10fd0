"""Copies between host and device memory on dedicated CUDA streams, completed through events.

One stream per direction, because H2D and D2H use separate copy engines and together reach ~1.7x
either alone on the H100 machine (55 + 55 -> 91 GB/s): putting both on one stream would serialize
them. Each stream has one waiter thread that blocks on the recorded events in issue order (events
on one stream complete in order) and completes the matching `Future`; `Event.synchronize` releases
the GIL. The events are created with `cudaEventBlockingSync`, so a waiter sleeps until the GPU
signals instead of spinning: with CUDA's default a waiter keeps a core busy for as long as a copy
is in flight (or waits on compute), a core that the CPU optimizer and the SSD threads need. On the
H100 machine (benchmarks/RESULTS.md, issue 3) spinning took 0.08 CPU-s per 80 ms pass of 256 MiB
copies, one core, against 0.01 s sleeping, at the same 54 GB/s. The price is wake-up latency:
with 16 MiB moves (0.3 ms each) and only two in flight, D2H fell to a median 25 GB/s sleeping
against 47 spinning (H2D: 44 either way), so small moves want more of them in flight (expected to
hide the latency; not yet measured). `spin_wait=True` brings the spinning back. Without CUDA
there are no streams: host-to-host copies run on a small thread pool instead, so the runtime's
schedule of futures is the same in CI.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class EventWaiter:
    """A thread that completes futures when their CUDA events have happened, in order."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, event: torch.cuda.Event) -> Future:
        future: Future = Future()
        self._queue.put((event, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            event, future = item
            try:
                event.synchronize()
            except BaseException as error:  # noqa: BLE001 - a CUDA error belongs to the waiting caller
                future.set_exception(error)
            else:
                future.set_result(None)


class CopyEngine:
    """Issues memory-to-memory copies and returns futures.

    Args:
        device: the CUDA device, or None on a machine without one.
        num_host_threads: threads for host-to-host copies.
        spin_wait: waiter threads spin on their events instead of sleeping (see the module docstring).
    """

    def __init__(self, device: torch.device | None, num_host_threads: int = 2, spin_wait: bool = False) -> None:
        self.device = device
        self.spin_wait = spin_wait
        # (kind, start event, end event, num_bytes) per CUDA copy once a profiler sets [] (fuyou.timeline):
        # when the copy stream ran it, where the store's trace has its issue and the host seeing it done.
        self.device_timings: list[tuple[str, torch.cuda.Event, torch.cuda.Event, int]] | None = None
        self._host_pool = ThreadPoolExecutor(max_workers=num_host_threads, thread_name_prefix="offload-h2h")
        if device is not None:
            self.h2d_stream = torch.cuda.Stream(device)
            self.d2h_stream = torch.cuda.Stream(device)
            self._waiters = {self.h2d_stream: EventWaiter("offload-h2d-wait"), self.d2h_stream: EventWaiter("offload-d2h-wait")}

    def producer_event(self) -> torch.cuda.Event | None:
        """An event on the caller's current stream: the copy waits for work the caller issued before it."""
        if self.device is None:
            return None
        return self._record(torch.cuda.current_stream(self.device))

    def wait_event(self, event: torch.cuda.Event) -> Future:
        """A future done once `event` has happened (used before kvikio touches device memory)."""
        return self._waiters[self.d2h_stream].submit(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after) -> tuple[str, Future]:
        """Copy `src` into `dst` (same shape and dtype); returns the direction's name and a future.

        `after`: an event, or a list of events, the copy's stream waits on first (from
        `producer_event`, or earlier copies' `future.cuda_event`). A CUDA copy's future carries the
        event recorded after it as `future.cuda_event`, so a later copy that must follow it can
        wait on the GPU instead of on the host (see `TieredStore.copy`).
        """
        if not (dst.is_cuda or src.is_cuda):
            return "h2h", self._host_pool.submit(dst.copy_, src)
        kind = "d2d" if dst.is_cuda and src.is_cuda else "h2d" if dst.is_cuda else "d2h"
        stream = self.d2h_stream if kind == "d2h" else self.h2d_stream
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            for event in after if isinstance(after, list) else [after]:
                if event is not None:
                    stream.wait_event(event)
            began = self._timing_event(stream) if self.device_timings is not None else None
            dst.copy_(src, non_blocking=True)
            # Keep the caching allocator from handing these blocks to another stream before the
            # copy has run, should the caller drop its references early.
            for tensor in (dst, src):
                if tensor.is_cuda:
                    tensor.record_stream(stream)
            done = self._record(stream)
            if began is not None:
                self.device_timings.append((kind, began, self._timing_event(stream), src.numel() * src.element_size()))
        future = self._waiters[stream].submit(done)
        future.cuda_event = done
        return kind, future

    @staticmethod
    def _timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def _record(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event(blocking=not self.spin_wait)
        event.record(stream)
        return event

    def close(self) -> None:
        self._host_pool.shutdown(wait=True)
        if self.device is not None:
            for waiter in self._waiters.values():
                waiter.close()


def wait_for_device(device: torch.device) -> None:
    """Block until the work queued on `device`'s current stream is done, sleeping with the GIL released.

    For a caller about to read a device value (`.item()`, `.tolist()`): those wait for the stream inside
    the copy, and a Python thread blocked there can keep the CPU optimizer's worker, which needs the GIL
    between its kernels, from running. A blocking-sync event waits without spinning and without the GIL.
    No-op on the CPU.
    """
    if device.type != "cuda":
        return
    done = torch.cuda.Event(blocking=True)
    done.record()
    done.synchronize()
