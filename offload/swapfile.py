"""A preallocated swap file under a directory, carved into extents, with optional checksums.

Lifecycle: the free space is checked before anything is created (so an impossible plan fails in
the first second with "needs 212.0 GB under /x, 64.0 GB free", not hours in), the whole file is
preallocated with `posix_fallocate` (so the run cannot hit ENOSPC half-way because another job
filled the disk), and the file is removed on `close()`, on leaving a `with` block through an
exception, and at interpreter exit for a forgotten one (a `weakref.finalize`, which also runs atexit).

Extents: first-fit over a free list with coalescing. Every extent starts at a multiple of 4096 and
has a padded capacity, because O_DIRECT moves whole aligned blocks; the true byte count is kept in
the extent so that reads hand back exactly what was written.

Checksums (optional): computed over the true bytes of the host buffer before it is written and
verified after every read, so a flipped bit on disk raises `OffloadError` instead of being trained
on. xxhash's xxh3 (tens of GB/s) when installed, else `zlib.crc32` (about 2.5 GB/s a thread, in the
standard library); both run on a small thread pool since they release the GIL. A checksum needs
the bytes on the host: device buffers cannot be verified here, so the store stages through host
memory when checksums are on.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from offload.budget import format_bytes
from offload.errors import OffloadError
from offload.futures import then
from offload.pinned import ALIGN_BYTES, round_up
from offload.ssd import SSDBackend

try:
    import xxhash

    def _checksum(buffer) -> int:
        return xxhash.xxh3_64_intdigest(buffer)

    CHECKSUM_NAME = "xxh3_64"
except ImportError:

    def _checksum(buffer) -> int:
        return zlib.crc32(buffer)

    CHECKSUM_NAME = "crc32"


@dataclass(frozen=True)
class Extent:
    """A region of the swap file.

    Attributes:
        file_offset: start, a multiple of 4096.
        capacity_bytes: padded length, a multiple of 4096.
        num_bytes: the true length of the data it holds.
    """

    file_offset: int
    capacity_bytes: int
    num_bytes: int


def _existing_ancestor(directory: str) -> str:
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _remove_file(backend: SSDBackend, state: dict) -> None:
    # Module-level so the finalizer holds no reference to the SwapFile it cleans up after.
    if state.get("handle") is not None:
        backend.close(state.pop("handle"))
    path = state.pop("path", None)
    if path is not None and os.path.exists(path):
        os.remove(path)


class SwapFile:
    """One preallocated file holding extents.

    Args:
        directory: where the file goes (created if missing), e.g. a RAID-0 of NVMe SSDs.
        num_bytes: size to preallocate; rounded up to 4096.
        backend: the `SSDBackend` that does the I/O.
        checksum: keep a checksum per extent and verify it on every read.
        num_checksum_threads: threads computing checksums (zlib and xxhash release the GIL).

    Raises:
        OffloadError: if the filesystem has less free space than `num_bytes`; nothing is created.
    """

    def __init__(
        self,
        directory: str,
        num_bytes: int,
        backend: SSDBackend,
        *,
        checksum: bool = False,
        num_checksum_threads: int = 4,
    ) -> None:
        self.num_bytes = round_up(max(num_bytes, ALIGN_BYTES))
        free_bytes = shutil.disk_usage(_existing_ancestor(directory)).free
        if self.num_bytes > free_bytes:
            raise OffloadError(
                f"swap file needs {format_bytes(self.num_bytes)} under {directory}, {format_bytes(free_bytes)} free; "
                "free space there, point ssd_dir at a larger disk, or keep more on the CPU"
            )
        os.makedirs(directory, exist_ok=True)
        self.backend = backend
        self.checksum = checksum
        fd, self.path = tempfile.mkstemp(prefix="fuyou-swap-", suffix=".bin", dir=directory)
        self._state = {"path": self.path}
        self._finalizer = weakref.finalize(self, _remove_file, backend, self._state)
        try:
            try:
                os.posix_fallocate(fd, 0, self.num_bytes)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise OffloadError(
                        f"swap file needs {format_bytes(self.num_bytes)} under {directory} and the disk filled "
                        "while preallocating; free space there or point ssd_dir at a larger disk"
                    ) from error
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, self.num_bytes)  # a filesystem without fallocate: sparse is the best there is
        finally:
            os.close(fd)
        try:
            self._state["handle"] = backend.open(self.path)
        except BaseException:
            self._finalizer()
            raise
        self._free: list[tuple[int, int]] = [(0, self.num_bytes)]  # (file_offset, capacity_bytes), sorted
        self._checksums: dict[int, int] = {}
        self._checksum_pool = ThreadPoolExecutor(max_workers=num_checksum_threads, thread_name_prefix="offload-checksum")

    @property
    def direct(self) -> bool:
        """Whether I/O bypasses the page cache (False on filesystems that refuse O_DIRECT)."""
        return getattr(self._state["handle"], "direct", True)

    def allocate(self, num_bytes: int) -> Extent:
        """An extent for `num_bytes`; first fit.

        Raises:
            OffloadError: if no free region is large enough.
        """
        capacity_bytes = round_up(max(num_bytes, 1))
        for index, (file_offset, free_bytes) in enumerate(self._free):
            if free_bytes >= capacity_bytes:
                if free_bytes == capacity_bytes:
                    del self._free[index]
                else:
                    self._free[index] = (file_offset + capacity_bytes, free_bytes - capacity_bytes)
                return Extent(file_offset, capacity_bytes, num_bytes)
        free_total = sum(size for _, size in self._free)
        raise OffloadError(
            f"swap file {self.path} is full: {format_bytes(capacity_bytes)} asked, {format_bytes(free_total)} free "
            f"of {format_bytes(self.num_bytes)}; give the store a larger ssd_num_bytes"
        )

    def free(self, extent: Extent) -> None:
        """Return an extent; neighbours merge so large extents stay available."""
        self._checksums.pop(extent.file_offset, None)
        self._free.append((extent.file_offset, extent.capacity_bytes))
        self._free.sort()
        merged = [self._free[0]]
        for file_offset, size in self._free[1:]:
            last_offset, last_size = merged[-1]
            assert last_offset + last_size <= file_offset, "extent freed twice"
            if last_offset + last_size == file_offset:
                merged[-1] = (last_offset, last_size + size)
            else:
                merged.append((file_offset, size))
        self._free = merged

    def write(self, extent: Extent, src: torch.Tensor) -> Future:
        """Write `src` (uint8, `extent.capacity_bytes` long, its first `extent.num_bytes` the data)."""
        assert src.numel() == extent.capacity_bytes
        handle = self._state["handle"]
        if not self.checksum:
            return self.backend.write(handle, src, extent.file_offset)
        assert not src.is_cuda, "checksums need host buffers"

        def record_checksum() -> None:
            self._checksums[extent.file_offset] = _checksum(src[: extent.num_bytes].numpy())

        return then(self._checksum_pool.submit(record_checksum), lambda: self.backend.write(handle, src, extent.file_offset))

    def read(self, extent: Extent, dst: torch.Tensor) -> Future:
        """Fill `dst` (uint8, `extent.capacity_bytes` long); with checksums on, verify the true bytes.

        The future raises `OffloadError` on a checksum mismatch.
        """
        assert dst.numel() == extent.capacity_bytes
        read = self.backend.read(self._state["handle"], dst, extent.file_offset)
        if not self.checksum:
            return read
        assert not dst.is_cuda, "checksums need host buffers"

        def verify() -> int:
            expected = self._checksums.get(extent.file_offset)
            assert expected is not None, "extent read before it was written"
            actual = _checksum(dst[: extent.num_bytes].numpy())
            if actual != expected:
                raise OffloadError(
                    f"{CHECKSUM_NAME} mismatch in {self.path} at byte {extent.file_offset} "
                    f"({extent.num_bytes} bytes): the disk returned corrupted data; check the SSD and rerun"
                )
            return extent.capacity_bytes

        return then(read, lambda: self._checksum_pool.submit(verify))

    def close(self) -> None:
        """Close the file and remove it (idempotent)."""
        self._checksum_pool.shutdown(wait=True)
        self._finalizer()

    def __enter__(self) -> "SwapFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
