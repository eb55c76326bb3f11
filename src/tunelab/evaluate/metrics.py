"""Task metrics on generated completions: exact match, BLEU, ROUGE-L.

* exact match: after normalising case, whitespace and punctuation (``normalize``); a
  prediction is right when it equals any reference of its prompt;
* BLEU: sacrebleu's corpus BLEU (13a tokenisation), references as parallel streams, a prompt
  with fewer references padded with None (sacrebleu's variable-reference convention);
* ROUGE-L: Google's ``rouge-score`` package, F-measure of the longest common subsequence,
  the best reference per prompt, averaged.

All three are on a 0-100 scale (docs/practices.md#overfit-metrics).
"""

from __future__ import annotations

from typing import Sequence

from ..config import ConfigError
from ..data.answers import exact_match, exact_match_score, normalize  # noqa: F401  (the one rule, shared with the recipe's probe)

METRICS = ("em", "bleu", "rougeL", "loss")


def bleu_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    if not predictions:
        return float("nan")
    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    from rouge_score import rouge_scorer

    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * sum(scorer.score_multi(list(r), p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


def parse_metrics(spec: str) -> list[str]:
    """``em,bleu,rougeL,loss`` -> the list, each name checked."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ConfigError(f"--metrics {spec!r}: unknown {bad or 'empty'}; choose from {','.join(METRICS)}")
    return names
