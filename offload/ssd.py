"""SSD backends: asynchronous reads and writes of aligned byte ranges, behind one small protocol.

Two backends implement `SSDBackend`:
- `KvikioBackend` (CUDA machines): kvikio's `CuFile.pread/pwrite`, which use GPUDirect Storage
  where the system supports it and kvikio's own C++ thread pool (POSIX, bounce buffers) otherwise,
  into host or device buffers. Imported lazily: kvikio fails to load without `libcuda.so.1`.
- `PosixBackend` (anywhere): a Python thread pool doing `os.preadv`/`os.pwritev` on a file opened
  with O_DIRECT, into aligned host buffers. Hand-written because no installable library does this
  portably: DeepSpeed's async_io needs libaio, which the GPU machine lacks, and kvikio cannot be
  imported at all on a machine without a CUDA driver, where CI runs. The syscalls release the GIL,
  so threads give real queue depth. Filesystems that refuse O_DIRECT (tmpfs) get buffered I/O.

The contract for both: buffers are contiguous uint8 tensors whose length is a multiple of 4096,
file offsets are multiples of 4096, host buffers start at 4096-aligned addresses (see
`offload.pinned`). The caller pads and remembers true sizes: O_DIRECT writes of a partial block
fail or, through some libraries, silently drop the tail. A short read or write raises `OSError`.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from offload.futures import gather
from offload.pinned import ALIGN_BYTES


class SSDBackend(Protocol):
    """Asynchronous aligned I/O on swap files."""

    name: str
    accepts_device_buffers: bool  # True: `read`/`write` take CUDA tensors directly

    def open(self, path: str) -> object:
        """Open an existing file for reading and writing; returns the backend's handle."""
        ...

    def close(self, handle: object) -> None: ...

    def read(self, handle: object, dst: torch.Tensor, file_offset: int) -> Future:
        """Fill `dst` (uint8, len % 4096 == 0) from `file_offset`; the future's result is the byte count."""
        ...

    def write(self, handle: object, src: torch.Tensor, file_offset: int) -> Future:
        """Write all of `src` (uint8, len % 4096 == 0) at `file_offset`; result: the byte count."""
        ...

    def shutdown(self) -> None: ...


def _check_aligned(buffer: torch.Tensor, file_offset: int) -> None:
    assert buffer.dtype == torch.uint8 and buffer.is_contiguous(), (buffer.dtype, buffer.shape)
    assert buffer.numel() % ALIGN_BYTES == 0 and file_offset % ALIGN_BYTES == 0, (buffer.numel(), file_offset)
    assert buffer.is_cuda or buffer.data_ptr() % ALIGN_BYTES == 0, "host buffer not 4096-aligned"


@dataclass
class PosixHandle:
    path: str
    fd: int
    direct: bool  # False where the filesystem refused O_DIRECT


class PosixBackend:
    """Thread-pool O_DIRECT I/O; each request is split into `chunk_bytes` pieces run in parallel.

    Args:
        num_threads: I/O threads, i.e. the most requests the disk sees at once.
        chunk_bytes: piece size; 8 MiB was the best single-request size on the H100 machine's disk.
    """

    name = "posix"
    accepts_device_buffers = False

    def __init__(self, num_threads: int = 8, chunk_bytes: int = 8 << 20) -> None:
        assert chunk_bytes % ALIGN_BYTES == 0
        self.chunk_bytes = chunk_bytes
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="offload-posix-io")

    def open(self, path: str) -> PosixHandle:
        try:
            return PosixHandle(path, os.open(path, os.O_RDWR | os.O_DIRECT), direct=True)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            return PosixHandle(path, os.open(path, os.O_RDWR), direct=False)

    def close(self, handle: PosixHandle) -> None:
        os.close(handle.fd)

    def read(self, handle: PosixHandle, dst: torch.Tensor, file_offset: int) -> Future:
        _check_aligned(dst, file_offset)
        return self._split(os.preadv, handle, dst, file_offset)

    def write(self, handle: PosixHandle, src: torch.Tensor, file_offset: int) -> Future:
        _check_aligned(src, file_offset)
        return self._split(os.pwritev, handle, src, file_offset)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    def _split(self, syscall, handle: PosixHandle, buffer: torch.Tensor, file_offset: int) -> Future:
        view = memoryview(buffer.numpy())
        futures = [
            self._pool.submit(_io_all, syscall, handle.fd, view[start : start + self.chunk_bytes], file_offset + start)
            for start in range(0, len(view), self.chunk_bytes)
        ]
        if len(futures) == 1:
            return futures[0]
        out: Future = Future()
        gather(futures).add_done_callback(
            lambda done: out.set_exception(done.exception()) if done.exception() else out.set_result(len(view))
        )
        return out


def _io_all(syscall, fd: int, view: memoryview, file_offset: int) -> int:
    """preadv/pwritev until the whole view is done: both may return short counts legitimately."""
    done = 0
    while done < len(view):
        count = syscall(fd, [view[done:]], file_offset + done)
        if count <= 0:
            raise OSError(errno.EIO, f"short {syscall.__name__} at offset {file_offset + done} of fd {fd}")
        done += count
    return done


class KvikioBackend:
    """kvikio's `CuFile` with opportunistic O_DIRECT, into host or CUDA buffers.

    kvikio returns its own `IOFuture`; a small pool of waiter threads turns each into a
    `concurrent.futures.Future` (the `get()` call blocks outside the GIL).

    Args:
        num_threads: kvikio's I/O thread pool size.
        chunk_bytes: kvikio's task size (how a request is split across its threads).
    """

    name = "kvikio"
    accepts_device_buffers = True

    def __init__(self, num_threads: int = 8, chunk_bytes: int = 8 << 20) -> None:
        import kvikio  # lazy: needs libcuda
        import kvikio.defaults

        self._kvikio = kvikio
        # O_DIRECT for the aligned parts: without it reads of a file just written come from the
        # page cache and measure RAM, and writes fill RAM with dirty pages the training never reads.
        kvikio.defaults.set(
            {
                "num_threads": num_threads,
                "task_size": chunk_bytes,
                "auto_direct_io_read": True,
                "auto_direct_io_write": True,
            }
        )
        self.compat_mode = str(kvikio.defaults.get("compat_mode"))
        self._waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="offload-kvikio-wait")

    def open(self, path: str):
        return self._kvikio.CuFile(path, "r+")

    def close(self, handle) -> None:
        handle.close()

    def read(self, handle, dst: torch.Tensor, file_offset: int) -> Future:
        _check_aligned(dst, file_offset)
        io_future = handle.pread(_kvikio_buffer(dst), dst.numel(), file_offset)
        return self._waiters.submit(_get_all, io_future, dst.numel(), "pread", file_offset)

    def write(self, handle, src: torch.Tensor, file_offset: int) -> Future:
        _check_aligned(src, file_offset)
        io_future = handle.pwrite(_kvikio_buffer(src), src.numel(), file_offset)
        return self._waiters.submit(_get_all, io_future, src.numel(), "pwrite", file_offset)

    def shutdown(self) -> None:
        self._waiters.shutdown(wait=True)


def _kvikio_buffer(tensor: torch.Tensor):
    # CUDA tensors carry __cuda_array_interface__; host tensors go through numpy's buffer protocol.
    return tensor if tensor.is_cuda else tensor.numpy()


def _get_all(io_future, num_bytes: int, what: str, file_offset: int) -> int:
    count = io_future.get()
    if count != num_bytes:
        raise OSError(errno.EIO, f"short kvikio {what}: {count} of {num_bytes} bytes at offset {file_offset}")
    return count


def kvikio_importable() -> bool:
    """Whether kvikio loads here (it needs a CUDA driver, so never on CPU-only machines)."""
    if not torch.cuda.is_available():
        return False
    try:
        import kvikio  # noqa: F401
    except Exception:  # noqa: BLE001 - any load failure (missing libcuda, libcufile) means "no"
        return False
    return True


def make_backend(name: str = "auto", *, num_threads: int = 8, chunk_bytes: int = 8 << 20) -> SSDBackend:
    """'posix', 'kvikio', or 'auto' (kvikio where it loads, else posix)."""
    if name == "auto":
        name = "kvikio" if kvikio_importable() else "posix"
    if name == "posix":
        return PosixBackend(num_threads, chunk_bytes)
    if name == "kvikio":
        return KvikioBackend(num_threads, chunk_bytes)
    from offload.errors import OffloadError

    raise OffloadError(f"unknown SSD backend {name!r}; use 'auto', 'posix' or 'kvikio'")
