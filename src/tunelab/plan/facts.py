"""What the doctor and the advice need to know about the data, from the audit's passes.

The records are read and rendered by the audit (``audit.run_audit`` without the
near-duplicate pass), so the lengths are the audit's length pass over the rendered template
(``audit/lengths.py``): the same counts ``tunelab audit`` prints.

Knowledge injection (docs/practices.md#sft-format-not-facts): a dataset whose completions are
mostly unique statements of facts the prompt does not contain (numbers, names) and which
share few forms teaches facts, which SFT does poorly; retrieval does it well. Measured per
record: the *fact tokens* of the completion (numbers, capitalised words not opening a
sentence) that do not occur in the prompt; a record *states a new fact* when it has at least
one and they are at least half of its fact tokens. The forms: completions' first three
words, lower-cased with digits replaced. Classification labels (few distinct completions) and
format tasks (the answer's facts come from the prompt) do not fire.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d[\d.,:/\-]*")
SENTENCE_END = re.compile(r"[.!?:;]\s*$")

KNOWLEDGE_MIN_RECORDS = 20
KNOWLEDGE_NEW_FACT_SHARE = 0.6  # records stating a fact the prompt lacks
KNOWLEDGE_UNIQUE_SHARE = 0.9  # distinct completions / records
KNOWLEDGE_TOP_FORM_SHARE = 0.3  # the most common opening covers less than this share: few repeated forms


@dataclass
class KnowledgeSmell:
    records: int = 0
    new_fact_share: float = 0.0
    unique_share: float = 0.0
    top_form_share: float = 0.0
    examples: list[str] = field(default_factory=list)

    @property
    def fires(self) -> bool:
        return (self.records >= KNOWLEDGE_MIN_RECORDS and self.new_fact_share >= KNOWLEDGE_NEW_FACT_SHARE
                and self.unique_share >= KNOWLEDGE_UNIQUE_SHARE and self.top_form_share < KNOWLEDGE_TOP_FORM_SHARE)

    def summary(self) -> str:
        return (f"{100 * self.new_fact_share:.0f}% of {self.records} completions state numbers or names absent from their prompt, "
                f"{100 * self.unique_share:.0f}% are distinct, the most common opening covers {100 * self.top_form_share:.0f}%")


def _fact_tokens(text: str) -> list[str]:
    out = []
    prev = ""
    for m in WORD.finditer(text):
        w = m.group(0)
        opens_sentence = not prev or bool(SENTENCE_END.search(text[: m.start()]))
        if w[0].isdigit() or (w[0].isupper() and not opens_sentence and len(w) > 1):
            out.append(w.lower().rstrip(".,"))
        prev = w
    return out


def _form(text: str) -> str:
    words = [re.sub(r"\d", "0", w.lower()) for w in WORD.findall(text)[:3]]
    return " ".join(words)


def knowledge_smell(pairs: Sequence[tuple[str, str]]) -> KnowledgeSmell:
    """``pairs``: (prompt text, completion text) per training record."""
    if not pairs:
        return KnowledgeSmell()
    new_fact = 0
    examples = []
    for prompt, completion in pairs:
        facts = _fact_tokens(completion)
        if not facts:
            continue
        p = prompt.lower()
        new = [f for f in facts if f not in p]
        if new and len(new) >= 0.5 * len(facts):
            new_fact += 1
            if len(examples) < 3:
                examples.append(completion[:100])
    n = len(pairs)
    forms = Counter(_form(c) for _, c in pairs)
    return KnowledgeSmell(n, new_fact / n, len({c.strip() for _, c in pairs}) / n, forms.most_common(1)[0][1] / n, examples)


@dataclass
class DataFacts:
    """The data as the doctor and the advice see it."""

    n_train: int
    n_eval: int
    unit: str  # tokens, or words when no tokenizer could be loaded
    max_seq_len: Optional[int]
    total: dict  # percentiles of the rendered length (p50, p90, p95, p99, max, mean)
    over: int  # records longer than max_seq_len
    partly: int  # records that lose part of their completion
    entirely: int  # records that lose all of it
    trained_fraction: float  # mean share of the tokens that carry loss
    knowledge: KnowledgeSmell
    note: str = ""

    @property
    def affected(self) -> int:
        """Records that max_seq_len drops (truncation: drop) or truncates."""
        return self.over

    def suggested_max_seq_len(self) -> Optional[int]:
        """The p99 of the rendered lengths rounded up to a multiple of 64: keeps 99% whole."""
        p99 = self.total.get("p99")
        return None if p99 is None else int(64 * math.ceil(p99 / 64))


def _text(msgs: Sequence[Any]) -> str:
    return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(getattr(m, "content", "")) for m in msgs)


def data_facts(train: Sequence[Any], evals: Sequence[Any] = (), renderer: Any = None, max_seq_len: Optional[int] = None,
               seed: int = 0, eval_fraction: float = 0.0) -> DataFacts:
    """Read and measure the data through the audit (no near-duplicate pass: not needed here)."""
    from ..audit import AuditOptions, run_audit
    from ..audit.core import renderer_info

    info = renderer_info(renderer) if renderer is not None else {"unit": "words"}
    opts = AuditOptions(max_seq_len=max_seq_len, seed=seed, near_dups=False)
    report = run_audit(list(train), list(evals), renderer=renderer, options=opts, tokenizer_info=info)
    lengths = report.sections["lengths"]
    pairs = []
    for r in report.records:
        if r.conv is None or r.split != "train":
            continue
        msgs = list(r.conv.messages)
        if not msgs:
            continue
        pairs.append((_text(msgs[:-1]), _text(msgs[-1:])))
    n_train = sum(1 for r in report.records if r.split == "train" and r.conv is not None)
    n_eval = sum(1 for r in report.records if r.split == "eval" and r.conv is not None)
    if eval_fraction and not evals:
        n_eval = int(round(n_train * eval_fraction))
        n_train -= n_eval
    comp, total = lengths.get("completion", {}), lengths.get("total", {})
    frac = (comp.get("mean", 0) / total["mean"]) if total.get("mean") else 0.5
    return DataFacts(n_train, n_eval, lengths.get("unit", "tokens"), max_seq_len, total, lengths.get("over_max_seq_len", 0),
                     lengths.get("completion_cut_partly", 0), lengths.get("completion_cut_entirely", 0), frac,
                     knowledge_smell(pairs), lengths.get("note", ""))
