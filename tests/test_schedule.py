"""LR schedules: linear warmup to the peak, then cosine / linear decay to min_lr_ratio, or
constant. The value at 0-based step s is the LR of the s-th optimizer update."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.train.schedule import lr_factor, make_scheduler

PEAK = 2e-4


def _trace(total: int, warmup: float, schedule: str, min_ratio: float, peak: float = PEAK) -> list[float]:
    """The LR of each update, read as the recipe reads it (get_last_lr before scheduler.step)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=peak)
    sched = make_scheduler(opt, total, warmup, schedule, min_ratio)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    out.append(sched.get_last_lr()[0])  # the value after the last update: the schedule's end
    return out


def test_cosine_exact_values():
    # total 10, warmup 20% = 2 steps: 1/2, 2/2, then cosine over the remaining 8 steps.
    lrs = _trace(10, 0.2, "cosine", 0.1)
    min_r = 0.1
    cos = lambda prog: min_r + (1 - min_r) * 0.5 * (1 + math.cos(math.pi * prog))  # noqa: E731
    want = [0.5, 1.0] + [cos((s - 2) / 8) for s in range(2, 11)]
    assert lrs == pytest.approx([PEAK * w for w in want], rel=1e-12, abs=0)
    assert lrs[6] == pytest.approx(PEAK * 0.55, rel=1e-12)  # halfway through the decay: (1 + 0.1) / 2
    assert lrs[-1] == pytest.approx(PEAK * 0.1, rel=1e-12)  # ends at min_lr_ratio
    assert max(lrs) == pytest.approx(PEAK, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])), "monotone after warmup"


def test_linear_exact_values():
    lrs = _trace(8, 0.25, "linear", 0.0)  # warmup 2 steps, then 6 steps of linear decay to 0
    want = [0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]
    assert lrs == pytest.approx([PEAK * w for w in want], rel=1e-12, abs=1e-20)
    lrs = _trace(6, 0.0, "linear", 0.5)  # no warmup, decay to half the peak
    assert lrs == pytest.approx([PEAK * (0.5 + 0.5 * (1 - s / 6)) for s in range(7)], rel=1e-12)
    assert lrs[-1] == pytest.approx(PEAK * 0.5, rel=1e-12)


def test_constant_with_warmup_exact_values():
    lrs = _trace(10, 0.3, "constant_with_warmup", 0.0)
    assert lrs == pytest.approx([PEAK / 3, 2 * PEAK / 3] + [PEAK] * 9, rel=1e-12)


def test_no_warmup_starts_at_peak():
    for sched in ("cosine", "linear", "constant_with_warmup"):
        assert _trace(5, 0.0, sched, 0.0)[0] == PEAK


def test_warmup_steps_are_the_ceiling_of_the_fraction_without_float_noise():
    # 0.07 * 100 = 7.000000000000001 in floating point: that is 7 warmup steps, not 8.
    lrs = _trace(100, 0.07, "constant_with_warmup", 0.0, peak=1.0)
    assert lrs[:8] == pytest.approx([(s + 1) / 7 for s in range(7)] + [1.0], rel=1e-12)
    lrs = _trace(30, 0.1, "linear", 0.0, peak=1.0)  # 0.1 * 30 = 3.0000000000000004
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0], rel=1e-12) and lrs[3] == 1.0
    lrs = _trace(10, 0.05, "linear", 0.0, peak=1.0)  # 0.5 step of warmup rounds up to one
    assert lrs[:3] == pytest.approx([1.0, 1.0, 1 - 1 / 9], rel=1e-12)


def test_lr_factor_pure_function():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == 1.0
    assert lr_factor(10, 100, 10, "cosine", 0.0) == 1.0
    assert lr_factor(55, 100, 10, "cosine", 0.2) == pytest.approx(0.6)
    assert lr_factor(100, 100, 10, "linear", 0.2) == pytest.approx(0.2)
    assert lr_factor(500, 100, 10, "cosine", 0.2) == pytest.approx(0.2)  # clamped past the end
    with pytest.raises(ValueError):
        lr_factor(20, 100, 10, "exponential", 0.0)
