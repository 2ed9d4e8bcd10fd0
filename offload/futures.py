"""Small combinators over `concurrent.futures.Future`, the one future type every move returns.

Why not asyncio: moves complete on I/O threads, on CUDA-event waiter threads, and inside
kvikio's C++ thread pool, and the runtime that waits on them is ordinary synchronous code; plain
`concurrent.futures.Future` works from all of them without an event loop. Callbacks added with
`add_done_callback` run on whichever thread completes the future, so the functions chained here
only issue work (submit, enqueue a copy) and never block.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Iterable


def completed(result=None) -> Future:
    """A future that is already done with `result`."""
    future: Future = Future()
    future.set_result(result)
    return future


def forward(source: Future, target: Future, result=None, *, use_source_result: bool = False) -> None:
    """When `source` is done, finish `target` with `source`'s exception, or with `result`."""

    def on_done(done: Future) -> None:
        error = done.exception()
        if error is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result() if use_source_result else result)

    source.add_done_callback(on_done)


def gather(futures: Iterable[Future]) -> Future:
    """A future done when all are done; its result is the list of results, or the first exception."""
    futures = list(futures)
    out: Future = Future()
    if not futures:
        out.set_result([])
        return out
    lock = threading.Lock()
    remaining = [len(futures)]

    def on_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            errors = [f.exception() for f in futures if f.exception() is not None]
            results = None if errors else [f.result() for f in futures]
            # Each input's callback list holds this closure, and the closure holds `futures`: clear
            # the list, or the cycle keeps every input (and the tensors it carries) alive until the
            # cyclic GC runs, which can be long after the step that freed them (GPU memory leak).
            futures.clear()
            if errors:
                out.set_exception(errors[0])
            else:
                out.set_result(results)

    for future in futures:
        future.add_done_callback(on_done)
    return out


def then(first: Future, next_step: Callable[[], Future]) -> Future:
    """Run `next_step()` (which issues work and returns its future) once `first` succeeded.

    The returned future has `next_step`'s result; an exception in `first` or in `next_step` skips
    the rest of the chain and lands in the returned future.
    """
    out: Future = Future()
    # `first` may outlive the chain (a long-lived "ready" future), and its callback list keeps this
    # closure: hold `out` (and through it the chain's result tensors) only until the callback fires.
    pending = [out, next_step]

    def on_done(done: Future) -> None:
        target, step = pending
        pending.clear()
        error = done.exception()
        if error is not None:
            target.set_exception(error)
            return
        try:
            following = step()
        except BaseException as exc:  # noqa: BLE001 - delivered to whoever waits on the chain
            target.set_exception(exc)
            return
        forward(following, target, use_source_result=True)

    first.add_done_callback(on_done)
    return out


def finally_(future: Future, cleanup: Callable[[], None]) -> Future:
    """Run `cleanup()` once `future` is done, success or not, before the returned future completes.

    Used to give staging buffers back to their pool only after the move that used them ended.
    """
    out: Future = Future()

    def on_done(done: Future) -> None:
        try:
            cleanup()
        except BaseException as exc:  # noqa: BLE001
            out.set_exception(exc)
            return
        forward(done, out, use_source_result=True)

    future.add_done_callback(on_done)
    return out
