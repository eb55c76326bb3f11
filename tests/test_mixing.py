"""Weighted mixing and the seeded, stratified eval split."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from tunelab.data.mixing import mix, stratified_split


def items(task, n):
    return [SimpleNamespace(task=task, i=i) for i in range(n)]


def test_stratified_split_keeps_task_proportions_and_is_seeded():
    data = items("a", 100) + items("b", 50) + items("c", 1)
    train, ev = stratified_split(data, 0.2, seed=3)
    assert len(train) + len(ev) == 151 and not ({id(x) for x in train} & {id(x) for x in ev})
    c = Counter(x.task for x in ev)
    assert c["a"] == 20 and c["b"] == 10 and c["c"] == 0  # a one-example task stays in train
    again, _ = stratified_split(data, 0.2, seed=3)
    assert [id(x) for x in again] == [id(x) for x in train]
    other, _ = stratified_split(data, 0.2, seed=4)
    assert [id(x) for x in other] != [id(x) for x in train]


def test_mix_follows_weights():
    a, b = items("a", 300), items("b", 100)
    out = mix([(a, 1.0), (b, 1.0)], seed=0)
    c = Counter(x.task for x in out)
    assert c == {"a": 200, "b": 200}  # equal weights -> equal shares; b repeated twice
    out = mix([(a, 3.0), (b, 1.0)], seed=0)
    assert Counter(x.task for x in out) == {"a": 300, "b": 100}
    assert mix([(a, 5.0)], seed=0) == a
