"""Weighted mixing of datasets and the seeded, task-stratified eval split."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence, TypeVar

T = TypeVar("T")


def stratified_split(items: Sequence[T], fraction: float, seed: int, key=lambda x: getattr(x, "task", None)) -> tuple[list[T], list[T]]:
    """Split off ``fraction`` of ``items`` for eval, the same fraction from every task.

    Each task keeps at least one training example; a task with a single example stays in
    train. Rounding is carried across tasks so the eval size matches ``fraction`` overall.
    """
    if fraction <= 0:
        return list(items), []
    rng = random.Random(seed)
    groups: dict[object, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[key(it)].append(i)
    eval_idx: set[int] = set()
    carry = 0.0
    for task in sorted(groups, key=str):
        idx = groups[task][:]
        rng.shuffle(idx)
        want = len(idx) * fraction + carry
        n = min(int(round(want)), len(idx) - 1)
        carry = want - n
        eval_idx.update(idx[:max(n, 0)])
    train = [it for i, it in enumerate(items) if i not in eval_idx]
    ev = [it for i, it in enumerate(items) if i in eval_idx]
    return train, ev


def mix(datasets: Sequence[tuple[Sequence[T], float]], seed: int) -> list[T]:
    """Mix datasets so that dataset i makes up weight_i / sum(weights) of the result.

    The total stays the sum of the datasets' sizes; a dataset asked for more than it has is
    repeated (whole copies, then a seeded sample), one asked for less is sampled without
    replacement. With one dataset this is the identity.
    """
    if len(datasets) == 1:
        return list(datasets[0][0])
    total = sum(len(d) for d, _ in datasets)
    wsum = sum(w for _, w in datasets)
    rng = random.Random(seed)
    out: list[T] = []
    for d, w in datasets:
        if not d:
            continue
        target = int(round(total * w / wsum))
        copies, rest = divmod(target, len(d))
        out.extend(list(d) * copies)
        out.extend(rng.sample(list(d), rest))
    return out
