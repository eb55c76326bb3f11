"""Balance: the distribution of training records over tasks, and over labels within a task.

The label of a record is its ``label`` field when records carry one; otherwise its
completion, when the task's completions come from a small set (<= ``max_labels`` distinct
values over >= ``min_records`` records: a classification task written as generation).
A task whose labels have a max/min ratio above ``threshold`` is flagged, and so is a task
with a single label: 200/200 "positive" teaches the model to say "positive" whatever the
input (its ratio is infinite).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from .artifacts import strip_markers
from .findings import WARNING, FindingList
from .normalize import TextViews, normalize, split_prompt
from .reader import AuditRecord

SECTION = "balance"


@dataclass
class Distribution:
    name: str  # task name, or "tasks" for the distribution over tasks
    n: int
    source: str  # "task" | "label field" | "completion"
    counts: list[tuple[str, int]]  # most common first
    ratio: float  # max / min (inf for a single class)
    largest_share: float
    flagged: bool = False

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "records": self.n,
            "source": self.source,
            "classes": len(self.counts),
            "counts": dict(self.counts[:50]),
            "imbalance_ratio": None if math.isinf(self.ratio) else round(self.ratio, 3),
            "single_class": len(self.counts) == 1,
            "largest_share": round(self.largest_share, 4),
            "flagged": self.flagged,
        }


@dataclass
class BalanceResult:
    threshold: float
    tasks: Optional[Distribution] = None
    labels: list[Distribution] = field(default_factory=list)
    label_of: dict[int, str] = field(default_factory=dict)  # record idx -> its label (label tasks only)
    examples: dict[str, list[str]] = field(default_factory=dict)  # task -> first record ids


def _dist(name: str, source: str, counter: Counter, display: dict[str, str], threshold: float) -> Distribution:
    counts = [(display.get(k, k), v) for k, v in counter.most_common()]
    n = sum(counter.values())
    hi, lo = counts[0][1], counts[-1][1]
    ratio = math.inf if len(counts) == 1 else hi / lo
    return Distribution(name, n, source, counts, ratio, hi / n, flagged=ratio > threshold)


def label_text(rec: AuditRecord) -> Optional[str]:
    """The completion as a label: stripped of whitespace and stray special tokens."""
    if rec.conv is None or rec.conv.is_text:
        return None
    _, last = split_prompt(rec.conv)
    return strip_markers(last["content"]).strip() if last else None


def analyze(records: list[AuditRecord], views: TextViews, threshold: float = 10.0, max_labels: int = 50, min_records: int = 200) -> BalanceResult:
    res = BalanceResult(threshold)
    train = [r for r in records if r.split == "train" and r.conv is not None]
    by_task: dict[str, list[AuditRecord]] = defaultdict(list)
    for r in train:
        by_task[r.task or "(none)"].append(r)
    for task, rs in by_task.items():
        res.examples[task] = [r.where for r in rs[:5]]
    if len(by_task) > 1:
        res.tasks = _dist("tasks", "task", Counter({t: len(rs) for t, rs in by_task.items()}), {}, threshold)

    for task, rs in sorted(by_task.items()):
        explicit = {r.idx for r in rs if isinstance(r.data, dict) and isinstance(r.data.get("label"), (str, int, float, bool))}
        if len(explicit) >= 0.9 * len(rs):
            raw = {r.idx: str(r.data.get("label")) for r in rs if r.idx in explicit}
            source = "label field"
        else:
            if len(rs) < min_records or len({views.completion_key[r.idx] for r in rs}) > 2 * max_labels:
                continue  # free-text completions (cheap test on the normalized completions first)
            raw = {r.idx: label_text(r) for r in rs}
            raw = {i: v for i, v in raw.items() if v is not None}
            source = "completion"
        keys = {i: (normalize(v) or v) for i, v in raw.items()}
        counter = Counter(keys.values())
        if not counter:
            continue
        if source == "completion" and not (len(rs) >= min_records and len(counter) <= max_labels):
            continue  # free-text completions: not a classification task
        display: dict[str, str] = {}
        forms: dict[str, Counter] = defaultdict(Counter)
        for i, k in keys.items():
            forms[k][raw[i]] += 1
        for k, c in forms.items():
            display[k] = c.most_common(1)[0][0]
        d = _dist(task, source, counter, display, threshold)
        d.flagged = d.flagged or len(counter) == 1
        res.labels.append(d)
        for i, k in keys.items():
            res.label_of[i] = display[k]
    return res


def findings(res: BalanceResult) -> FindingList:
    out = FindingList()
    t = res.tasks
    if t is not None and t.flagged:
        out.add("task_imbalance", WARNING,
                f"tasks are imbalanced: {t.counts[0][0]} has {t.counts[0][1]} records, {t.counts[-1][0]} has {t.counts[-1][1]} "
                f"(ratio {t.ratio:.1f}x > {res.threshold:g}x; the largest task is {t.largest_share:.0%} of the data)",
                t.n, res.examples.get(t.counts[-1][0], []),
                "Rebalance the mix: set `weight:` per dataset, or tunelab audit --fix OUT --balance cap|upsample.", SECTION)
    for d in res.labels:
        if not d.flagged:
            continue
        shown = ", ".join(f"{k!r}: {v}" for k, v in d.counts[:5])
        if len(d.counts) == 1:
            label = d.counts[0][0]
            out.add("single_label", WARNING,
                    f"{d.name}: every record has the same label {label!r} ({d.n}/{d.n}, from the {d.source}); "
                    f"the model learns to answer {label!r} whatever the input",
                    d.n, res.examples.get(d.name, []),
                    "Add records of the other labels (a sorted slice of a dataset often holds one label: shuffle before slicing), or drop the task.",
                    SECTION)
        else:
            out.add("label_imbalance", WARNING,
                    f"{d.name}: labels are imbalanced ({shown}; ratio {d.ratio:.1f}x > {res.threshold:g}x, "
                    f"the largest label is {d.largest_share:.0%})",
                    d.n, res.examples.get(d.name, []),
                    "Collect more of the rare labels, or tunelab audit --fix OUT --balance cap|upsample.", SECTION)
    return out


def details(res: BalanceResult) -> dict:
    return {
        "threshold": res.threshold,
        "tasks": res.tasks.to_dict() if res.tasks else None,
        "labels": [d.to_dict() for d in res.labels],
    }
