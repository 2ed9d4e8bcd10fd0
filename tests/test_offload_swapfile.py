"""Swap files: space checked before anything is written, checksums catch corruption, files never left behind."""

import os
import shutil

import pytest
import torch

from offload import OffloadError, PinnedPool, PosixBackend, SwapFile, TieredStore


def test_out_of_space_raises_before_writing(tmp_path):
    free_bytes = shutil.disk_usage(tmp_path).free
    target = tmp_path / "swap"
    with pytest.raises(OffloadError, match=r"needs [0-9.]+ [kMGT]?B under .*, [0-9.]+ [kMGT]?B free") as error:
        TieredStore(ssd_dir=str(target), ssd_num_bytes=free_bytes + (1 << 40))
    assert "\n" not in str(error.value)
    assert not target.exists()  # not even the directory
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_after_flipping_a_byte(tmp_path):
    with TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=1 << 20, checksum=True) as store:
        source = torch.arange(3000, dtype=torch.float32)
        store.put("x", source, "ssd").result()
        extent = store.home("x").extent
        with open(store.swap.path, "r+b") as file:  # corrupt one byte in the middle of the data
            file.seek(extent.file_offset + 5000)
            byte = file.read(1)
            file.seek(extent.file_offset + 5000)
            file.write(bytes([byte[0] ^ 0x10]))
        with pytest.raises(OffloadError, match="mismatch"):
            store.fetch("x", "cpu").result(timeout=30)


def test_corrupted_padding_is_not_an_error(tmp_path):
    """Only the true bytes are checked; the O_DIRECT padding beyond them carries nothing."""
    with TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=1 << 20, checksum=True) as store:
        source = torch.arange(1000, dtype=torch.int64)  # 8000 bytes in an 8192-byte extent
        store.put("x", source, "ssd").result()
        extent = store.home("x").extent
        with open(store.swap.path, "r+b") as file:
            file.seek(extent.file_offset + 8100)
            file.write(b"\xff")
        assert torch.equal(store.fetch("x", "cpu").result(timeout=30), source)


def test_swap_file_removed_after_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=1 << 20) as store:
            store.put("x", torch.ones(10), "ssd").result()
            assert os.path.exists(store.swap.path)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_swap_file_removed_when_forgotten(tmp_path):
    backend = PosixBackend(num_threads=1)
    swap = SwapFile(str(tmp_path), 1 << 16, backend)
    path = swap.path
    assert os.path.getsize(path) == 1 << 16  # preallocated up front
    del swap  # the finalizer runs here, or at interpreter exit
    assert not os.path.exists(path)
    backend.shutdown()


def test_extents_padded_reused_and_full_error(tmp_path):
    backend = PosixBackend(num_threads=2, chunk_bytes=4096)
    with SwapFile(str(tmp_path), 5 * 4096, backend) as swap:
        first, second = swap.allocate(1), swap.allocate(4097)
        assert (first.file_offset, first.capacity_bytes, first.num_bytes) == (0, 4096, 1)
        assert (second.file_offset, second.capacity_bytes) == (4096, 8192)
        swap.free(first)
        third = swap.allocate(8192)  # does not fit in the hole at 0: goes after
        assert third.file_offset == 12288
        with pytest.raises(OffloadError, match="is full"):
            swap.allocate(8192)
        swap.free(second)
        assert swap.allocate(3 * 4096).file_offset == 0  # freed neighbours merged
    backend.shutdown()


def test_multichunk_io_bit_exact(tmp_path):
    """Requests split over threads in 4 KiB pieces land in the right places."""
    backend = PosixBackend(num_threads=4, chunk_bytes=4096)
    pool = PinnedPool(None, pin=False)
    with SwapFile(str(tmp_path), 1 << 20, backend) as swap:
        extent = swap.allocate(100_000)
        source, target = pool.acquire(100_000), pool.acquire(100_000)
        source.data.copy_(torch.randint(0, 256, (source.capacity_bytes,), dtype=torch.uint8))
        swap.write(extent, source.view(extent.capacity_bytes)).result()
        swap.read(extent, target.view(extent.capacity_bytes)).result()
        assert torch.equal(source.data, target.data)
    backend.shutdown()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
def test_falls_back_to_buffered_io_where_o_direct_is_refused(tmp_path):
    directory = f"/dev/shm/offload-test-{os.getpid()}"
    try:
        with TieredStore(ssd_dir=directory, ssd_num_bytes=1 << 20) as store:
            source = torch.randn(5000)
            store.put("x", source, "ssd").result()
            assert torch.equal(store.fetch("x", "cpu").result(timeout=30), source)
            direct = store.swap.direct
        assert os.listdir(directory) == []
        assert direct is False or direct is True  # tmpfs refuses O_DIRECT on most kernels; both must work
    finally:
        shutil.rmtree(directory, ignore_errors=True)
