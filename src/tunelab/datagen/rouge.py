"""ROUGE-L (F-measure over the longest common subsequence of tokens), and an index that finds
the kept texts a candidate could score >= a threshold against without scoring every one.

Tokens are those of ``rouge_score`` without stemming (Wang et al. 2022 use
``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``): lower-cased ``[a-z0-9]+`` runs.
F = 2 * LCS / (m + n) for token counts m and n.

The reference implementation scores a candidate against the whole pool in a process pool,
O(pool) Python work per candidate. Here an inverted index (token -> texts holding it, with
counts) gives, in a few numpy operations, for every kept text the multiset overlap with the
candidate, sum_t min(count_a(t), count_b(t)), which bounds the LCS from above. Only texts whose
bound 2 * overlap / (m + n) reaches the threshold are scored exactly, so the result is exactly
the brute force's (tests/test_datagen_filters.py checks it) at a small fraction of the work.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Optional, Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else (prev[j + 1] if prev[j + 1] > cur[j] else cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: Sequence, b: Sequence) -> float:
    """ROUGE-L F1 of two token sequences (symmetric)."""
    if not a or not b:
        return 0.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


class _Grow:
    """A growable numpy array (amortized O(1) append)."""

    __slots__ = ("a", "n")

    def __init__(self, dtype: type, cap: int = 4):
        self.a = np.empty(cap, dtype=dtype)
        self.n = 0

    def append(self, x: int) -> None:
        if self.n == len(self.a):
            self.a = np.resize(self.a, 2 * len(self.a))
        self.a[self.n] = x
        self.n += 1

    def view(self) -> np.ndarray:
        return self.a[: self.n]


class RougeIndex:
    """Texts kept so far; ``best(candidate)`` is the highest ROUGE-L against any of them."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.ids: list[_Grow] = []  # token id -> text ids holding it
        self.counts: list[_Grow] = []  # ... and how often
        self.lengths = _Grow(np.int32, 1024)
        self.texts: list[list[int]] = []  # token ids of each text, for the exact LCS
        self.exact_scored = 0  # texts scored exactly (the rest were ruled out by the bound)

    def __len__(self) -> int:
        return len(self.texts)

    def _encode(self, toks: Sequence[str], grow: bool) -> list[int]:
        if grow:
            return [self.vocab.setdefault(t, len(self.vocab)) for t in toks]
        return [self.vocab.get(t, -1) for t in toks]

    def add(self, text: str) -> int:
        ids = self._encode(tokens(text), grow=True)
        k = len(self.texts)
        for _ in range(len(self.vocab) - len(self.ids)):
            self.ids.append(_Grow(np.int32))
            self.counts.append(_Grow(np.int32))
        for t, c in Counter(ids).items():
            self.ids[t].append(k)
            self.counts[t].append(c)
        self.texts.append(ids)
        self.lengths.append(len(ids))
        return k

    def best(self, text: str, threshold: float = 0.0) -> tuple[float, Optional[int]]:
        """(highest ROUGE-L against a kept text, its id); stops at the first >= ``threshold``
        when ``threshold`` > 0 (enough to reject). (0.0, None) when nothing can reach it."""
        cand = self._encode(tokens(text), grow=False)
        m = len(cand)
        n = len(self.texts)
        if m == 0 or n == 0:
            return 0.0, None
        known = Counter(t for t in cand if t >= 0)
        if not known:
            return 0.0, None
        parts_i, parts_w = [], []
        for t, c in known.items():
            ids = self.ids[t].view()
            parts_i.append(ids)
            parts_w.append(np.minimum(self.counts[t].view(), c))
        overlap = np.bincount(np.concatenate(parts_i), weights=np.concatenate(parts_w), minlength=n)
        bound = 2.0 * overlap / (m + self.lengths.view())
        floor = threshold if threshold > 0 else 1e-12
        hits = np.flatnonzero(bound >= floor - 1e-12)
        if hits.size == 0:
            return 0.0, None
        hits = hits[np.argsort(-bound[hits], kind="stable")]
        best, arg = 0.0, None
        for k in hits.tolist():
            if bound[k] <= best:
                break  # no later text can beat the best found
            self.exact_scored += 1
            s = rouge_l(cand, self.texts[k])
            if s > best:
                best, arg = s, k
                if threshold > 0 and best >= threshold:
                    break
        return best, arg
