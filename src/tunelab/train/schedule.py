"""Learning-rate schedules: linear warmup, then cosine / linear decay or constant.

Always warm up (3-10% of steps) to avoid early loss spikes (docs/practices.md#hp-warmup); cosine
decay is the common choice (#schedule-cosine); a constant LR without decay risks forgetting
pretrained capabilities (#schedule-decay).
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for the update at 0-based ``step``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant_with_warmup":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float, schedule: str, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    # round() first: 0.07 * 100 == 7.000000000000001 must give 7 warmup steps, not 8
    warmup = int(math.ceil(round(warmup_fraction * total, 9))) if warmup_fraction > 0 else 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, schedule, min_ratio))
