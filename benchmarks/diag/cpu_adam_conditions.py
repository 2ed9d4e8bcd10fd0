"""Which of the runtime's conditions slows CPU AdamW: pinned memory, concurrent GPU/PCIe load, thread count
(issue 5). Run at e0b6b66 (RESULTS.md), where the load was bare GEMMs + copies; now the probe's block
workload + copies (`fuyou.plan.probe.cpu_rates_under_load`).

    PYTHONPATH=. python benchmarks/diag/cpu_adam_conditions.py      # needs CUDA
"""
import time

import torch
from fuyou.plan.probe import cpu_rates_under_load, adam_gparams_per_s
from offload.cpu_optimizer import AdamWKernel
from offload.pinned import PinnedPool

def pinned_alone(n=64 << 20, groups=4, repeats=5):
    pool = PinnedPool()
    st = [pool.acquire(12 * n).view(12 * n).view(torch.float32).fill_(0.5).view(3, n) for _ in range(groups)]
    gr = [pool.acquire(4 * n).view(4 * n).view(torch.float32).normal_() for _ in range(groups)]
    k = AdamWKernel("torch", betas=(0.9, 0.95), eps=1e-8)
    best = 1e9
    for step in range(1, repeats + 2):
        t = time.perf_counter()
        for s, g in zip(st, gr):
            k.step(s[0], g, s[1], s[2], step=step, lr=1e-4, weight_decay=0.1)
        if step > 1:
            best = min(best, time.perf_counter() - t)
    pool.close()
    return n * groups / best / 1e9

for threads in (16, 14, 12):
    torch.set_num_threads(threads)
    alone, kind = adam_gparams_per_s(256 << 20, 5)
    print(f"threads {threads}: pageable alone {alone:.2f}  pinned alone {pinned_alone():.2f}  "
          f"pinned under load {cpu_rates_under_load(False)[0]:.2f} Gparam/s", flush=True)
