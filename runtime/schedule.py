"""Learning-rate schedule: linear warm-up, then cosine / linear decay to min_lr_ratio * lr, or constant."""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = lr * min_lr_ratio
    if schedule == "linear":
        return floor + (lr - floor) * (1.0 - progress)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
