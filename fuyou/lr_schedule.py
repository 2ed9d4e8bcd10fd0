"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

Kept apart from any trainer so that every runtime applies the very same rate at every step.
"""

import math


def lr_at_step(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The learning rate for optimizer step `step` (0-based).

    Warm-up: step s < W gets peak * (s + 1) / W, so the very first update is not zero.
    Decay: afterwards progress p = (s - W) / max(1, T - W) in [0, 1] and
    lr = floor + (peak - floor) * (1 + cos(pi * p)) / 2 with floor = peak * min_lr_ratio.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor_lr = peak_lr * min_lr_ratio
    return floor_lr + (peak_lr - floor_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
