"""Lengths of the rendered training text: percentiles, and what ``max_seq_len`` would cut.

Truncation model: right truncation at ``max_seq_len``, i.e. the model sees tokens
``[0, max_seq_len)`` of the rendered example. A record whose total length exceeds the limit
is *over*; it loses completion tokens *partly* when some trained (completion) tokens lie at
or beyond the limit and some before it, *entirely* when all of them lie beyond it. (With
``data.truncation: drop`` training drops every over-long record instead; with
``truncate_prompt`` it cuts the prompt first. The counts here say how much of the data the
limit affects either way.)

Prompt length = masked tokens (template, system, user turns), completion length = trained
tokens, total = both: the numbers ``encode_many`` would give the same record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .findings import INFO, WARNING, FindingList
from .normalize import TextViews
from .reader import AuditRecord
from .tokens import TokenCounts

SECTION = "lengths"
PERCENTILES = (50, 90, 95, 99)


def word_counts(records: list[AuditRecord], views: TextViews, max_seq_len: Optional[int]) -> TokenCounts:
    """Fallback without a tokenizer: words instead of tokens, no template.

    Words undercount tokens (a word is one or more tokens), so the counts of records over
    ``max_seq_len`` are lower bounds; the prompt is taken to come before the completion.
    """
    n = len(records)
    total = np.full(n, -1, np.int64)
    trained = np.full(n, -1, np.int64)
    kept = np.full(n, -1, np.int64)
    for r in records:
        if r.conv is None:
            continue
        p, c = int(views.prompt_words[r.idx]), int(views.trained_words[r.idx])
        total[r.idx], trained[r.idx] = p + c, c
        kept[r.idx] = c if max_seq_len is None else max(0, min(p + c, max_seq_len) - p)
    return TokenCounts("words", total, trained, kept, max_seq_len,
                       note="no tokenizer: lengths are word counts (a lower bound of token counts), without the template")


def _pct(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {}
    out = {f"p{p}": int(np.percentile(x, p, method="higher")) for p in PERCENTILES}
    out.update(min=int(x.min()), max=int(x.max()), mean=round(float(x.mean()), 1))
    return out


@dataclass
class LengthStats:
    unit: str
    max_seq_len: Optional[int]
    counted: int
    prompt: dict
    completion: dict
    total: dict
    over: list[int]
    partly: list[int]
    entirely: list[int]
    note: str = ""
    fast: int = 0
    slow: int = 0
    seconds: float = 0.0
    by_split: Optional[dict] = None
    sampled: bool = False
    within_bound: int = 0
    truncation: Optional[str] = None  # the configured data.truncation, None: right truncation

    def to_dict(self, records: list[AuditRecord]) -> dict:
        return {
            "unit": self.unit,
            "max_seq_len": self.max_seq_len,
            "truncation_model": TRUNCATION_WORDS.get(self.truncation, str(self.truncation)),
            "records_counted": self.counted,
            "percentiles_sampled": self.sampled,
            "records_within_bound": self.within_bound,
            "prompt": self.prompt,
            "completion": self.completion,
            "total": self.total,
            "over_max_seq_len": len(self.over),
            "completion_cut_partly": len(self.partly),
            "completion_cut_entirely": len(self.entirely),
            "examples": {
                "over_max_seq_len": [records[i].where for i in self.over[:10]],
                "completion_cut_partly": [records[i].where for i in self.partly[:10]],
                "completion_cut_entirely": [records[i].where for i in self.entirely[:10]],
            },
            "by_split": self.by_split,
            "note": self.note,
            "counted_fast": self.fast,
            "counted_slow": self.slow,
            "seconds": self.seconds,
        }


def stats(tc: TokenCounts, records: list[AuditRecord]) -> LengthStats:
    idx = np.flatnonzero(tc.total >= 0)
    over, partly, entirely = [], [], []
    if tc.max_seq_len is not None:
        # Every record over the limit is among the counted ones (the rest provably fit).
        total, trained, kept = tc.total[idx], tc.trained[idx], tc.kept_trained[idx]
        over = idx[total > tc.max_seq_len].tolist()
        partly = idx[(kept > 0) & (kept < trained)].tolist()
        entirely = idx[(kept == 0) & (trained > 0)].tolist()
    if tc.sample is not None:  # percentiles describe the random sample, not the records picked by the bound
        idx = tc.sample
    total, trained = tc.total[idx], tc.trained[idx]
    prompt = total - trained
    by_split = None
    splits = {r.split for r in records}
    if len(splits) > 1:
        by_split = {}
        for s in sorted(splits):
            sel = np.array([records[i].split == s for i in idx], dtype=bool)
            by_split[s] = {"records": int(sel.sum()), "total": _pct(total[sel]),
                           "over_max_seq_len": sum(1 for i in over if records[i].split == s)}
    note = tc.note
    if tc.sample is not None:
        n_conv = sum(1 for r in records if r.conv is not None)
        note = (note + "; " if note else "") + (
            f"percentiles from a seeded random sample of {len(tc.sample)} of {n_conv} records; "
            f"{tc.within_bound} records were not tokenized because their byte length proves they fit max_seq_len, "
            "so the counts over the limit are exact")
    st = LengthStats(tc.unit, tc.max_seq_len, len(idx), _pct(prompt), _pct(trained), _pct(total), over, partly, entirely,
                     note, tc.fast, tc.slow, tc.seconds, by_split)
    st.sampled = tc.sample is not None
    st.within_bound = tc.within_bound
    return st


TRUNCATION_WORDS = {
    None: "right truncation at max_seq_len (the model sees the first max_seq_len tokens)",
    "drop": "data.truncation: drop (a record longer than max_seq_len is not trained)",
    "truncate_prompt": "data.truncation: truncate_prompt (the prompt is cut from the left; the completion is kept whole when it fits)",
}


def findings(st: LengthStats, records: list[AuditRecord], tc: TokenCounts, truncation: Optional[str] = None) -> FindingList:
    """Length findings, worded for the configured ``truncation`` (None: the right-truncation model)."""
    out = FindingList()
    unit = st.unit
    lb = "at least " if unit == "words" else ""
    L = st.max_seq_len
    if st.over and truncation is not None:
        what = "dropped: not trained" if truncation == "drop" else "trained with the prompt cut from the left"
        out.add("over_max_seq_len", WARNING,
                f"{lb}{len(st.over)} records are longer than max_seq_len={L} {'tokens' if unit == 'tokens' else '(counted in words)'} "
                f"and will be {what} (truncation: {truncation}; longest {st.total.get('max')} {unit}, p99 {st.total.get('p99')})",
                len(st.over), [records[i].where for i in st.over],
                f"Raise data.max_seq_len (p99 is {st.total.get('p99')} {unit}) or shorten these records"
                + (", or set truncation: truncate_prompt to keep them with the prompt cut." if truncation == "drop" else "."),
                SECTION)
    elif st.over:
        out.add("over_max_seq_len", WARNING,
                f"{lb}{len(st.over)} records are longer than max_seq_len={L} {'tokens' if unit == 'tokens' else '(counted in words)'} "
                f"(longest {st.total.get('max')} {unit}; p99 {st.total.get('p99')})",
                len(st.over), [records[i].where for i in st.over],
                f"Raise data.max_seq_len (p99 is {st.total.get('p99')} {unit}) or shorten these records; with truncation: drop they are not trained.",
                SECTION)
    if st.partly and truncation is None:
        out.add("completion_truncated", WARNING,
                f"{lb}{len(st.partly)} records would lose part of their completion at max_seq_len={L} (right truncation)",
                len(st.partly), [records[i].where for i in st.partly],
                "Raise data.max_seq_len, or shorten the prompts (truncation: truncate_prompt keeps completions whole when they fit).",
                SECTION)
    if st.entirely and truncation is None:
        out.add("completion_lost", WARNING,
                f"{lb}{len(st.entirely)} records would lose their entire completion at max_seq_len={L}: the prompt alone fills the window",
                len(st.entirely), [records[i].where for i in st.entirely],
                "Raise data.max_seq_len or shorten these prompts: such records are never trained.",
                SECTION)
    if tc.errors:
        out.add("template_error", "error",
                f"{len(tc.errors)} records cannot be rendered with the template: {tc.errors[0][1][:160]}",
                len(tc.errors), [records[i].where for i, _ in tc.errors],
                "Use a template that supports these roles (template: chatml|llama3|...), or fix the conversations.",
                SECTION)
    if unit == "words":
        out.add("no_tokenizer", INFO, tc.note, 1, [], "Give --model (or --config) with a loadable tokenizer for token counts.", SECTION)
    return out
