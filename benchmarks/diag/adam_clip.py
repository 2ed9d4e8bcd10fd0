"""CPU AdamW with a clip factor: folded into torch's fused kernel (`grad_scale`) or a separate pass over
the gradient first, against no clip; alone and under the probe's load (issue 5: the runs' AdamW rate sat
12-20% under the probe's, and every step of those runs clips).

    PYTHONPATH=. python benchmarks/diag/adam_clip.py      # needs CUDA for the loaded rates
"""
import time

import torch

from fuyou.plan.probe import cpu_rates_under_load
from offload.cpu_optimizer import AdamWKernel


def alone(clip: float, fold_clip: bool, n: int = 64 << 20, groups: int = 4, repeats: int = 5) -> float:
    states = [torch.full((3, n), 0.5) for _ in range(groups)]
    grads = [torch.randn(n) for _ in range(groups)]
    kernel = AdamWKernel("torch", betas=(0.9, 0.95), eps=1e-8, fold_clip=fold_clip)
    best = float("inf")
    for step in range(1, repeats + 2):
        start = time.perf_counter()
        for state, grad in zip(states, grads):
            kernel.step(state[0], grad, state[1], state[2], step=step, lr=1e-4, weight_decay=0.1, clip=clip)
        if step > 1:
            best = min(best, time.perf_counter() - start)
    return n * groups / best / 1e9


print(f"threads {torch.get_num_threads()}")
for name, clip, fold in (("no clip", 1.0, True), ("clip, grad_scale", 0.05, True), ("clip, separate pass", 0.05, False)):
    loaded = cpu_rates_under_load(False, clip=clip, fold_clip=fold)[0] if torch.cuda.is_available() else float("nan")
    print(f"| {name} | alone {alone(clip, fold):.2f} | under load {loaded:.2f} Gparam/s |", flush=True)
