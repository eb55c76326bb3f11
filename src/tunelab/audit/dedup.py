"""Exact duplicates (after normalization), conflicting completions, and exact train/eval leakage."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .findings import ERROR, WARNING, FindingList
from .normalize import TextViews, split_prompt
from .reader import AuditRecord

SECTION = "duplicates"
MAX_DETAIL = 20  # groups listed in the JSON report


def preview(rec: AuditRecord, n: int = 100) -> str:
    """A one-line glimpse of a record: its prompt, or its text."""
    if rec.conv is None:
        return ""
    if rec.conv.is_text:
        s = rec.conv.text
    else:
        prompt, last = split_prompt(rec.conv)
        user = [m["content"] for m in prompt if m["role"] == "user"]
        s = user[-1] if user else (last["content"] if last else "")
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def completion_preview(rec: AuditRecord, n: int = 60) -> str:
    if rec.conv is None:
        return ""
    _, last = split_prompt(rec.conv)
    s = " ".join((last["content"] if last else "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


@dataclass
class DupResult:
    groups: list[list[int]] = field(default_factory=list)  # identical records within one split, in file order
    conflicts: list[list[int]] = field(default_factory=list)  # same prompt, different completions
    leaks: list[tuple[int, int, str]] = field(default_factory=list)  # (eval idx, train idx, "exact" | "same prompt")

    def drop(self) -> dict[int, int]:
        """idx -> idx of the kept record, for every copy after the first."""
        return {i: g[0] for g in self.groups for i in g[1:]}


def find_duplicates(records: list[AuditRecord], views: TextViews) -> DupResult:
    res = DupResult()
    by_key: dict = defaultdict(list)
    for r in records:
        k = views.full_key[r.idx]
        if k is not None:
            by_key[(r.split, k)].append(r.idx)
    res.groups = [g for g in by_key.values() if len(g) > 1]
    res.groups.sort(key=lambda g: (-len(g), g[0]))

    # Same prompt, different completions: label noise for classification, a coin toss for
    # the model otherwise. Checked per split (train and eval each on their own).
    by_prompt: dict = defaultdict(list)
    for r in records:
        k = views.prompt_key[r.idx]
        if k is not None and views.completion_key[r.idx] is not None:
            by_prompt[(r.split, k)].append(r.idx)
    for g in by_prompt.values():
        if len(g) > 1 and len({views.completion_key[i] for i in g}) > 1:
            res.conflicts.append(g)
    res.conflicts.sort(key=lambda g: (-len(g), g[0]))

    # Exact leakage: an eval record whose whole conversation, or whose prompt, is in train.
    train_full = {views.full_key[r.idx]: r.idx for r in reversed(records) if r.split == "train" and views.full_key[r.idx] is not None}
    train_prompt = {views.prompt_key[r.idx]: r.idx for r in reversed(records) if r.split == "train" and views.prompt_key[r.idx] is not None}
    for r in records:
        if r.split != "eval" or views.full_key[r.idx] is None:
            continue
        if views.full_key[r.idx] in train_full:
            res.leaks.append((r.idx, train_full[views.full_key[r.idx]], "exact"))
        elif views.prompt_key[r.idx] is not None and views.prompt_key[r.idx] in train_prompt:
            res.leaks.append((r.idx, train_prompt[views.prompt_key[r.idx]], "same prompt"))

    # Augmented copies (tunelab augment): an eval record of the same family as a train record,
    # i.e. one is augmented_from the other or both from the same original, however reworded.
    leaked = {e for e, _, _ in res.leaks}
    family, from_ids = {}, {}
    for r in reversed(records):
        if r.split == "train" and r.conv is not None and r.conv.group:
            family[r.conv.group] = r.idx
            if r.conv.augmented_from:
                from_ids[r.conv.augmented_from] = r.idx
    for r in records:
        c = r.conv
        if r.split != "eval" or c is None or r.idx in leaked or not c.group:
            continue
        t = family.get(c.augmented_from) if c.augmented_from else from_ids.get(c.group)
        if t is not None:
            res.leaks.append((r.idx, t, "augmented copy"))
    return res


def findings(res: DupResult, records: list[AuditRecord]) -> FindingList:
    out = FindingList()
    redundant = sum(len(g) - 1 for g in res.groups)
    if redundant:
        biggest = max(len(g) for g in res.groups)
        out.add("exact_duplicate", WARNING,
                f"{redundant} records repeat an earlier record (same text after normalizing case, whitespace and "
                f"punctuation), in {len(res.groups)} groups; the largest group has {biggest} copies",
                redundant, [records[i].where for g in res.groups for i in g[1:]],
                "Drop the repeats: tunelab audit --fix keeps the first record of each group. Repeated examples are memorized.",
                SECTION)
    if res.conflicts:
        n = sum(len(g) for g in res.conflicts)
        out.add("conflicting_completions", WARNING,
                f"{len(res.conflicts)} prompts appear with different completions ({n} records)",
                n, [records[i].where for g in res.conflicts for i in g],
                "Keep one correct completion per prompt; for classification data these are contradictory labels.",
                SECTION)
    return out


def details(res: DupResult, records: list[AuditRecord]) -> dict:
    return {
        "exact_groups": len(res.groups),
        "exact_redundant": sum(len(g) - 1 for g in res.groups),
        "groups": [
            {"size": len(g), "records": [records[i].where for i in g[:10]], "preview": preview(records[g[0]])}
            for g in res.groups[:MAX_DETAIL]
        ],
        "conflicts": [
            {
                "size": len(g),
                "records": [records[i].where for i in g[:10]],
                "prompt": preview(records[g[0]]),
                "completions": [{"text": t, "records": c} for t, c in Counter(completion_preview(records[i]) for i in g).most_common(5)],
            }
            for g in res.conflicts[:MAX_DETAIL]
        ],
    }


def leakage_finding(exact: list[tuple[int, int, str]], near: list[tuple[int, int, float]], records: list[AuditRecord]) -> FindingList:
    """Eval records with an exact or near-duplicate in train (one finding, counted per eval record)."""
    out = FindingList()
    by_eval: dict[int, str] = {}
    for e, t, kind in exact:
        by_eval.setdefault(e, f"{records[e].where} = {records[t].where} ({kind})")
    for e, t, j in near:
        by_eval.setdefault(e, f"{records[e].where} ~ {records[t].where} (Jaccard {j:.2f})")
    if by_eval:
        n_exact = len({e for e, _, _ in exact})
        out.add("train_eval_leakage", ERROR,
                f"{len(by_eval)} eval records also occur in train ({n_exact} exactly or with the same prompt, "
                f"{len(by_eval) - n_exact} as near-duplicates): eval scores would overstate generalization",
                len(by_eval), [records[e].where for e in sorted(by_eval)],
                "Remove these records from train (or from eval), e.g. split by source before deduplicating.",
                "leakage")
    return out


def leakage_details(exact: list[tuple[int, int, str]], near: list[tuple[int, int, float]], records: list[AuditRecord], limit: int = 50) -> list[dict]:
    rows = [{"eval": records[e].where, "train": records[t].where, "kind": kind, "jaccard": 1.0 if kind == "exact" else None} for e, t, kind in exact]
    rows += [{"eval": records[e].where, "train": records[t].where, "kind": "near", "jaccard": round(j, 4)} for e, t, j in near]
    return rows[:limit]
