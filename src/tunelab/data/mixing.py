"""Weighted mixing of datasets and the seeded, task-stratified eval split."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence, TypeVar

T = TypeVar("T")


def _group_of(x) -> object:
    return getattr(x, "group", None)


def stratified_split(items: Sequence[T], fraction: float, seed: int, key=lambda x: getattr(x, "task", None),
                     group=_group_of) -> tuple[list[T], list[T]]:
    """Split off ``fraction`` of ``items`` for eval, the same fraction from every task.

    Group-aware: items whose ``group(item)`` is equal (not None) move together, so the
    augmented copies of a record (``augmented_from``, see ``Conversation.group``) land on the
    same side as their original and eval never holds a paraphrase of a train record. A group
    belongs to the task of its first item. Each task keeps at least one training group; a task
    with a single group stays in train. Rounding is carried across tasks so the eval size
    matches ``fraction`` overall. With no groups (every item alone) the split is the same as
    a plain per-task shuffle.
    """
    if fraction <= 0:
        return list(items), []
    rng = random.Random(seed)
    units: dict[object, list[int]] = {}  # group -> item indices, in order of first appearance
    for i, it in enumerate(items):
        g = group(it)
        units.setdefault(("g", g) if g is not None else ("i", i), []).append(i)
    by_task: dict[object, list[list[int]]] = defaultdict(list)
    for members in units.values():
        by_task[key(items[members[0]])].append(members)
    eval_idx: set[int] = set()
    carry = 0.0
    for task in sorted(by_task, key=str):
        groups = by_task[task][:]
        rng.shuffle(groups)
        size = sum(len(g) for g in groups)
        want = size * fraction + carry
        target = int(round(want))
        taken = 0
        for g in groups[:-1]:  # the last group of a task always stays in train
            if taken >= target:
                break
            if taken + len(g) <= target or taken + len(g) - target < target - taken:
                eval_idx.update(g)
                taken += len(g)
        carry = want - taken
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
