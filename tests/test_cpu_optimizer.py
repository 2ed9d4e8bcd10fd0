"""The offloaded CPU AdamW: equal to torch.optim.AdamW, with state on CPU or SSD, and its clipping fix-up."""

import pytest
import torch

from offload import TieredStore
from offload.cpu_optimizer import OffloadedAdamW
from offload.futures import completed

BETAS, EPS, LR = (0.9, 0.95), 1e-8, 1e-2


def run_optimizer(tier, tmp_path, grads_per_step, clips, *, speculate):
    """Two groups through `len(grads_per_step)` steps; with `speculate`, update at clip 1 then fix up."""
    generator = torch.Generator().manual_seed(0)
    initial = {key: [torch.randn(300, generator=generator), torch.randn(7, generator=generator)] for key in ("a", "b")}
    published = {}
    with TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=1 << 20) as store:
        optimizer = OffloadedAdamW(store, tier, betas=BETAS, eps=EPS)
        for key, masters in initial.items():
            optimizer.add_group(key, masters, [0.1, 0.0], lambda m, key=key: completed(published.__setitem__(key, [t.clone() for t in m])))
        for grads, clip in zip(grads_per_step, clips):
            for key in initial:
                # Two micro-batches: the first copied into the accumulators, the second added (halves sum exactly).
                for buffer, grad in zip(optimizer.gradient_buffers(key), grads[key]):
                    buffer.copy_(grad * 0.5)
                optimizer.accumulate(key, None, completed(), last=False)
                optimizer.accumulate(key, [grad * 0.5 for grad in grads[key]], completed(), last=True)
            if speculate:
                optimizer.update("a", lr=LR, next_key="b")
                optimizer.update("b", lr=LR)
                if clip < 1:
                    optimizer.fix_up("a", lr=LR, clip=clip, next_key="b")
                    optimizer.fix_up("b", lr=LR, clip=clip)
            else:
                optimizer.update("a", lr=LR, clip=clip, next_key="b")
                optimizer.update("b", lr=LR, clip=clip)
            optimizer.end_step().result()
        result = {key: optimizer.masters(key) for key in initial}
        optimizer.close()
    for key in initial:
        for master, seen in zip(result[key], published[key]):
            assert torch.equal(master, seen)  # publish saw the final weights
    return initial, result


def make_grads(steps):
    generator = torch.Generator().manual_seed(1)
    return [{key: [torch.randn(300, generator=generator), torch.randn(7, generator=generator)] for key in ("a", "b")} for _ in range(steps)]


@pytest.mark.parametrize("tier", ["cpu", "ssd"])
def test_matches_torch_adamw(tier, tmp_path):
    grads = make_grads(3)
    initial, result = run_optimizer(tier, tmp_path, grads, [1.0, 0.5, 1.0], speculate=False)
    for key in ("a", "b"):
        params = [torch.nn.Parameter(t.clone()) for t in initial[key]]
        reference = torch.optim.AdamW([{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
        for step_grads, clip in zip(grads, [1.0, 0.5, 1.0]):
            for param, grad in zip(params, step_grads[key]):
                param.grad = grad * clip
            reference.step()
        for got, expected in zip(result[key], params):
            torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("tier", ["cpu", "ssd"])
def test_fix_up_equals_clipping_first(tier, tmp_path):
    # Step 1 clips hard on empty moments (the worst case for the fix-up's precision), step 2 does not.
    grads, clips = make_grads(3), [0.3, 1.0, 0.6]
    _, speculated = run_optimizer(tier, tmp_path, grads, clips, speculate=True)
    _, deferred = run_optimizer(tier, tmp_path, grads, clips, speculate=False)
    for key in ("a", "b"):
        for got, expected in zip(speculated[key], deferred[key]):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_groups_on_different_tiers_with_a_gradient_ring_and_three_state_buffers(tmp_path):
    # Six groups, the first two in RAM, the rest on SSD, updated in backward order with read-ahead as the
    # runtime does; gradients through a ring of two buffers. Matches torch's AdamW, and the SSD groups'
    # states pass through at most three pinned buffers (one written back, one updated, one read ahead).
    numel, keys = 4096, [f"g{i}" for i in range(6)]
    generator = torch.Generator().manual_seed(0)
    initial = {key: torch.randn(numel, generator=generator) for key in keys}
    grads = [{key: torch.randn(numel, generator=generator) for key in keys} for _ in range(3)]
    with TieredStore(ssd_dir=str(tmp_path), ssd_num_bytes=6 * 12 * numel) as store:
        optimizer = OffloadedAdamW(store, "ssd", betas=BETAS, eps=EPS, gradient_ring=2)
        for i, key in enumerate(keys):
            optimizer.add_group(key, [initial[key]], [0.1], lambda m: completed(), tier="cpu" if i < 2 else "ssd")
        order = keys[::-1]
        for step_grads in grads:
            for index, key in enumerate(order):
                buffer, = optimizer.gradient_buffers(key)  # waits while both buffers are out
                buffer.copy_(step_grads[key])
                optimizer.accumulate(key, None, completed(), last=True, norms=torch.linalg.vector_norm(step_grads[key]).reshape(1))
                optimizer.update(key, lr=LR, next_key=order[index + 1] if index + 1 < len(order) else order[0])
            optimizer.end_step().result()
        result = {key: optimizer.masters(key)[0] for key in keys}
        state_buffers = [b for b in store.pool._all if b.capacity_bytes == 3 * 4 * numel]
        assert {key: group.tier.value for key, group in optimizer.groups.items()} == {k: "cpu" if k in keys[:2] else "ssd" for k in keys}
        assert len(state_buffers) == 2 + 3  # the two RAM groups' homes, and three for the four SSD groups
        optimizer.close()
    for key in keys:
        param = torch.nn.Parameter(initial[key].clone())
        reference = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
        for step_grads in grads:
            param.grad = step_grads[key]
            reference.step()
        torch.testing.assert_close(result[key], param.detach(), rtol=0, atol=1e-6)  # values up to ~4: one ulp


def test_a_clip_folded_into_the_kernel_equals_a_separate_pass():
    """AdamWKernel(fold_clip=True) hands torch's kernel 1/clip as grad_scale; fold_clip=False scales the gradient
    first. Same update either way (the probe times both: benchmarks/diag/adam_clip.py)."""
    from offload.cpu_optimizer import AdamWKernel

    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(1000, generator=generator) for _ in range(3)]
    grad = torch.randn(1000, generator=generator)
    results = []
    for fold in (True, False):
        master, exp_avg, exp_avg_sq = (t.clone() for t in start)
        exp_avg_sq.abs_()
        kernel = AdamWKernel("torch", betas=(0.9, 0.95), eps=1e-8, fold_clip=fold)
        kernel.step(master, grad.clone(), exp_avg, exp_avg_sq, step=3, lr=1e-2, weight_decay=0.1, clip=0.3)
        results.append((master, exp_avg, exp_avg_sq))
    for folded, separate in zip(*results):
        torch.testing.assert_close(folded, separate, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0][0], start[0])
