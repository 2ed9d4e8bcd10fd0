"""TieredStore with CUDA: every GPU path, both backends, ordering against the compute stream, the GPU cap.

Run on the device machine: `python -m pytest -m gpu tests/test_offload_gpu.py`.
"""

import pytest
import torch

from offload import GiB, OffloadError, TieredStore, kvikio_importable

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BACKENDS = ["posix", pytest.param("kvikio", marks=pytest.mark.skipif(not kvikio_importable(), reason="kvikio not importable"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]


def random_tensor(numel, dtype, generator, device="cpu"):
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    tensor = (raw % 2).bool() if dtype is torch.bool else raw.view(dtype)
    return tensor.to(device)


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_ssd_cpu_round_trips(tmp_path, backend, checksum):
    generator = torch.Generator().manual_seed(0)
    with TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=64 << 20, cpu_cap_bytes=64 << 20, backend=backend, checksum=checksum, trace=True) as store:
        futures = []
        for numel in [1, 4095, 4096, 100_003]:
            for dtype in DTYPES:
                source = random_tensor(numel, dtype, generator, "cuda")  # not the store's: staged or padded
                on_ssd = store.empty(source.shape, dtype, "ssd")
                on_gpu = store.empty(source.shape, dtype, "gpu")  # the store's: padded, direct with kvikio
                on_cpu = store.empty(source.shape, dtype, "cpu")
                back = torch.empty_like(source)
                store.copy(on_ssd, source)
                store.copy(on_gpu, on_ssd)
                store.copy(on_cpu, on_gpu)
                futures.append((source, store.copy(back, on_cpu), on_gpu))
        for source, future, on_gpu in futures:
            assert same_bits(future.result(timeout=60), source)
            assert same_bits(on_gpu, source)
        assert {"h2d", "d2h", "ssd_read", "ssd_write"} <= {event.kind for event in store.trace}


def test_copy_waits_for_work_issued_before_it(tmp_path):
    """A copy issued right after a kernel on the compute stream sees the kernel's result."""
    with TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=64 << 20, cpu_cap_bytes=64 << 20) as store:
        a = torch.randn(2048, 2048, device="cuda")
        for _ in range(5):
            result = a @ a  # long enough that an unsynchronized copy would read garbage
            on_cpu = store.empty(result.shape, result.dtype, "cpu")
            future = store.copy(on_cpu, result)
            assert torch.equal(future.result(timeout=60), result.cpu())
            store.free(on_cpu)


def test_gpu_cap(tmp_path):
    torch.cuda.empty_cache()  # blocks cached by earlier tests would be reused without a cap check
    try:
        with TieredStore(gpu_cap_bytes=1 * GiB) as store:
            kept = store.empty((200 << 20,), torch.uint8, "gpu")
            with pytest.raises(OffloadError, match="GPU budget exceeded"):
                store.empty((900 << 20,), torch.uint8, "gpu")
            with pytest.raises(torch.OutOfMemoryError):
                torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")  # the process-wide cap
            assert store.report()["gpu_store"]["peak_bytes"] <= 1 * GiB
            store.free(kept)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_chained_copies_are_ordered_on_the_gpu():
    """Copies that must follow earlier CUDA copies are issued at once, ordered by events on the GPU.

    One device buffer is written from host buffer i and read back into output i, round after round:
    each H2D must wait for the previous D2H to have read the buffer (write after read, across the
    two streams), and each D2H for its H2D (read after write). Every output must hold its own input.
    """
    rounds, numel = 64, 1 << 20
    generator = torch.Generator().manual_seed(1)
    with TieredStore(cpu_cap_bytes=4 * rounds * numel * 4) as store:
        inputs = [store.empty((numel,), torch.float32, "cpu").copy_(torch.randn(numel, generator=generator)) for _ in range(rounds)]
        outputs = [store.empty((numel,), torch.float32, "cpu") for _ in range(rounds)]
        shared = store.empty((numel,), torch.float32, "gpu")
        futures = []
        for i in range(rounds):
            store.copy(shared, inputs[i])
            futures.append(store.copy(outputs[i], shared))
        # Every move is already issued to a copy stream (none waits on the host): each carries its event.
        assert all(getattr(store._writer.get(key), "cuda_event", True) is not None for key in list(store._writer))
        for i, future in enumerate(futures):
            assert torch.equal(future.result(timeout=60), inputs[i]), f"round {i} read another round's bytes"
