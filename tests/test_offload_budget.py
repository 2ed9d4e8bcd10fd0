"""Budgets: the store's accounting never exceeds a cap; pinned buffers are reused."""

import threading

import pytest
import torch

from offload import Budget, OffloadError, PinnedPool, TieredStore


def test_budget_raises_and_counts_nothing_past_the_cap():
    budget = Budget("pinned CPU", 10_000)
    budget.reserve(6000)
    with pytest.raises(OffloadError, match="pinned CPU budget exceeded") as error:
        budget.reserve(5000, "CPU tensor")
    assert "\n" not in str(error.value)
    assert (budget.used_bytes, budget.peak_bytes) == (6000, 6000)
    budget.release(6000)
    budget.reserve(10_000)
    assert budget.peak_bytes == 10_000


def test_pool_reuses_buffers_and_evicts_free_ones_to_fit():
    pool = PinnedPool(64 * 1024, pin=False)
    first = pool.acquire(10_000)
    assert first.capacity_bytes == 12288 and first.data.data_ptr() % 4096 == 0
    pool.release(first)
    again = pool.acquire(9000)  # same size class: the same memory comes back
    assert again.data.data_ptr() == first.data.data_ptr() and pool.num_allocations == 1
    pool.release(again)
    big = pool.acquire(60 * 1024)  # only fits once the free 12 KiB buffer is dropped
    assert pool.budget.used_bytes == 60 * 1024
    with pytest.raises(OffloadError, match="budget exceeded"):
        pool.acquire(8192)
    with pytest.raises(OffloadError, match="larger than the whole pinned CPU cap"):
        pool.acquire(1 << 20)
    pool.release(big)
    pool.close()
    assert pool.budget.used_bytes == 0 and pool.budget.peak_bytes <= 64 * 1024


def test_staging_waits_for_buffers_in_flight():
    pool = PinnedPool(8192, pin=False)
    staging = pool.acquire(8192, wait=True)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(8192, wait=True)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # waits instead of going over the cap
    pool.release(staging)
    waiter.join(5)
    assert got and pool.budget.peak_bytes == 8192


def test_store_peaks_stay_under_caps_with_many_moves(tmp_path):
    cap_bytes = 256 * 1024
    with TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=4 << 20, cpu_cap_bytes=cap_bytes) as store:
        sources = [torch.randn(n) for n in range(1000, 40_000, 1300)]
        homes = [store.empty(s.shape, s.dtype, "ssd") for s in sources]
        # Unowned sources stage through the pool: more bytes in flight than the cap, so some wait.
        futures = [store.copy(h, s) for h, s in zip(homes, sources)]
        futures += [store.copy(torch.empty_like(s), h) for h, s in zip(homes, sources)]
        for future, source in zip(futures[len(sources) :], sources):
            assert torch.equal(future.result(timeout=30), source)
        report = store.report()
        assert report["cpu_pinned"]["peak_bytes"] <= cap_bytes
        working = [store.empty((20_000,), torch.float32, "cpu") for _ in range(3)]  # 3 x 80 KB
        with pytest.raises(OffloadError, match="pinned CPU budget exceeded"):
            store.empty((20_000,), torch.float32, "cpu")
        for tensor in working:
            store.free(tensor)
        assert store.report()["cpu_pinned"]["peak_bytes"] <= cap_bytes
        assert store.report()["ssd"]["peak_bytes"] <= 4 << 20


def test_pool_close_drops_buffers_still_out():
    """Buffers still out at close are unpinned too (freed-while-registered memory breaks the next pin)."""
    pool = PinnedPool(1 << 20, pin=torch.cuda.is_available())
    kept = pool.acquire(10_000).view(10_000)
    pool.close()
    assert pool.budget.used_bytes == 0
    kept.fill_(7)  # the memory itself lives on while a tensor views it
    assert int(kept[-1]) == 7
