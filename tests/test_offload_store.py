"""TieredStore on the CPU: bit-exact round trips through every path, ordering, named tensors, trace."""

import random

import pytest
import torch

from offload import OffloadError, SSDTensor, TieredStore

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]


def random_tensor(numel: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    # Random bits rather than random values: every bit pattern (NaNs too) must survive.
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    if dtype is torch.bool:
        return (raw % 2).bool()
    return raw.view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture(params=[False, True], ids=["plain", "checksum"])
def store(request, tmp_path):
    with TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=32 << 20, cpu_cap_bytes=32 << 20, checksum=request.param, trace=True) as store:
        yield store


def test_round_trips_many_in_flight(store):
    """User tensor -> SSD -> store CPU tensor (direct) -> SSD -> user tensor (staged), all queued at once."""
    generator = torch.Generator().manual_seed(0)
    sizes = [0, 1, 3, 511, 512, 4095, 4096, 4097, 12345, 100_003]
    cases = [(random_tensor(n, dtype, generator), dtype) for n in sizes for dtype in DTYPES]
    futures = []
    for index, (source, _) in enumerate(cases):
        on_ssd = store.empty(source.shape, source.dtype, "ssd")
        on_cpu = store.empty(source.shape, source.dtype, "cpu")
        second_ssd = store.empty(source.shape, source.dtype, "ssd")
        back = torch.full_like(source, 0) if source.dtype is not torch.bool else torch.zeros_like(source)
        # Each copy is issued before the previous completes; the store orders them by tensor.
        store.copy(on_ssd, source)
        store.copy(on_cpu, on_ssd)
        store.copy(second_ssd, on_ssd)  # SSD -> SSD through staging
        futures.append((index, back, store.copy(back, second_ssd)))
    assert len(futures) == len(sizes) * len(DTYPES)
    for index, back, future in futures:
        assert future.result(timeout=30) is back
        assert same_bits(back, cases[index][0]), (sizes[index // len(DTYPES)], cases[index][1])
    store.synchronize()
    kinds = {event.kind for event in store.trace}
    assert {"h2h", "ssd_read", "ssd_write"} <= kinds
    assert all(event.end_s >= event.start_s and event.num_bytes >= 0 for event in store.trace)


def test_cpu_to_cpu_and_views(store):
    generator = torch.Generator().manual_seed(1)
    source = random_tensor(777, torch.bfloat16, generator).view(7, 111)
    target = store.empty((7, 111), torch.bfloat16, "cpu")
    store.copy(target, source).result()
    assert same_bits(target, source)
    with pytest.raises(OffloadError, match="contiguous"):
        store.copy(target.t(), source.t())
    with pytest.raises(OffloadError, match="shapes and dtypes"):
        store.copy(target, source.float())


def test_write_back_then_fetch_sees_new_bytes(store):
    """Issue order is the order on one extent: fetch after write_back reads the new version."""
    generator = torch.Generator().manual_seed(2)
    versions = [random_tensor(50_000, torch.float32, generator) for _ in range(6)]
    store.put("w", versions[0], "ssd")
    fetched = []
    for version in versions[1:]:
        fetched.append(store.fetch("w", "cpu"))  # reads the previous version
        store.write_back("w", version)
    last = store.fetch("w", "cpu")
    for previous, future in zip(versions, fetched):
        assert same_bits(future.result(timeout=30), previous)
    assert same_bits(last.result(timeout=30), versions[-1])
    assert isinstance(store.home("w"), SSDTensor)
    store.delete("w")
    with pytest.raises(OffloadError, match="no tensor named"):
        store.home("w")


def test_random_schedule_of_puts_fetches_frees(store):
    """A random interleaving like a runtime's: fetch ahead, write back behind, free working copies."""
    rng = random.Random(3)
    generator = torch.Generator().manual_seed(3)
    truth = {}
    for step in range(60):
        name = f"t{rng.randrange(8)}"
        if name not in truth:
            truth[name] = random_tensor(rng.randrange(1, 30_000), rng.choice(DTYPES), generator)
            store.put(name, truth[name], rng.choice(["ssd", "cpu"]))
            continue
        work = store.fetch(name, rng.choice(["cpu", "ssd"])).result(timeout=30)
        if isinstance(work, SSDTensor):
            back = store.empty(work.shape, work.dtype, "cpu")
            store.copy(back, work).result(timeout=30)
            assert same_bits(back, truth[name])
            store.free(back)
        else:
            assert same_bits(work, truth[name])
            truth[name] = random_tensor(work.numel(), work.dtype, generator).view(work.shape)
            store.write_back(name, truth[name])
        store.free(work)
    store.synchronize()
    for name, expected in truth.items():
        assert same_bits(store.fetch(name, "cpu").result(timeout=30), expected)


def test_no_ssd_tier_and_no_gpu_tier_say_so(tmp_path):
    with TieredStore(cpu_cap_bytes=1 << 20, device=None) as store:
        with pytest.raises(OffloadError, match="no SSD tier"):
            store.empty((4,), torch.float32, "ssd")
        if not torch.cuda.is_available():
            with pytest.raises(OffloadError, match="no GPU tier"):
                store.empty((4,), torch.float32, "gpu")


def test_io_error_reaches_the_future(tmp_path):
    """A failing leg fails its future and every later move on the same tensor, not the process."""
    # posix: the test reaches into its file handle to make the disk fail.
    store = TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=1 << 20, cpu_cap_bytes=1 << 20, backend="posix")
    try:
        on_ssd = store.empty((1000,), torch.float32, "ssd")
        store.swap.backend.close(store.swap._state["handle"])  # the disk goes away under the store
        store.swap._state["handle"].fd = 10**6
        first = store.copy(on_ssd, torch.ones(1000))
        second = store.copy(torch.empty(1000), on_ssd)
        with pytest.raises(OSError):
            first.result(timeout=30)
        with pytest.raises(OSError):
            second.result(timeout=30)
    finally:
        store.swap._state["handle"] = None
        store.close()
