"""When a generated answer counts as its reference: exact match after normalization.

It sits in ``data/`` so that the recipe's generation probe (``eval.generate_every``) and
``tunelab eval`` (``evaluate/metrics.py``) judge answers by the one rule.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    """True when the normalized prediction equals any normalized reference."""
    p = normalize(prediction)
    return any(p == normalize(r) for r in references)


def exact_match_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Exact match on a 0-100 scale (nan with no predictions)."""
    if not predictions:
        return float("nan")
    return 100.0 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(predictions)
