"""``--fix OUT``: a cleaned copy of the training records (JSONL of the original objects).

Dropped: records that cannot be trained (schema errors), records whose completion is only
special tokens or markers, exact duplicates (the first of each group is kept) and
near-duplicates (the first of each cluster is kept). ``--balance cap|upsample`` optionally
evens out labels (within each classification task) or, without labels, tasks.

The inputs are never touched: output goes to a temp file in the target folder that is
renamed into place (``os.replace``), and an output path that is one of the inputs is refused.
Eval files are not rewritten (only their leakage into train is reported).
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..files import atomic_write_jsonl
from .reader import AuditRecord
from .report import AuditReport
from .review import Review, to_fix_path
from .schema import untrainable_ids


@dataclass
class FixResult:
    outputs: list[str] = field(default_factory=list)
    read: int = 0  # train records read (lines that are not JSON are not records)
    written: int = 0
    removed: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> example ids
    added: int = 0  # copies added by --balance upsample
    notes: list[str] = field(default_factory=list)

    def _drop(self, reason: str, rec: AuditRecord, detail: str = "") -> None:
        self.removed[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(rec.where + (f" ({detail})" if detail else ""))

    def lines(self) -> list[str]:
        out = [f"--fix: wrote {self.written} of {self.read} train records to {', '.join(self.outputs)}"]
        for reason, n in self.removed.most_common():
            out.append(f"  removed {n:>6}  {reason}: e.g. {'; '.join(self.examples.get(reason, [])[:3])}")
        if self.added:
            out.append(f"  added   {self.added:>6}  copies of minority-class records (--balance upsample)")
        if not self.removed and not self.added:
            out.append("  nothing to remove")
        out += [f"  note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict:
        return {"outputs": self.outputs, "read": self.read, "written": self.written, "removed": dict(self.removed),
                "examples": self.examples, "added": self.added, "notes": self.notes}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _outputs(report: AuditReport, out: Path) -> dict[str, Path]:
    """Input file -> output path. A ``.jsonl`` OUT takes every train file; any other OUT is a folder."""
    train_files = [f.path for f in report.files if f.split == "train"]
    if out.suffix.lower() in (".jsonl", ".ndjson"):
        mapping = {p: out for p in train_files}
    else:
        names = Counter(Path(p).stem for p in train_files)
        mapping = {p: out / (Path(p).stem + (f".{k}" if names[Path(p).stem] > 1 else "") + ".jsonl") for k, p in enumerate(train_files)}
    inputs = [Path(f.path) for f in report.files]
    for target in set(mapping.values()):
        for src in inputs:
            if target.resolve() == src.resolve() or _same_file(target, src):
                raise FileExistsError(f"--fix: refusing to overwrite the input file {src}; choose another output path")
    return mapping


def _balance(kept: list[AuditRecord], report: AuditReport, mode: str, seed: int, ratio: float, res: FixResult) -> list[AuditRecord]:
    bal = report.results["balance"]
    rng = random.Random(seed)
    groups: dict[tuple, list[AuditRecord]] = defaultdict(list)
    label_tasks = {d.name for d in bal.labels}
    if label_tasks:
        for r in kept:
            if r.task in label_tasks and r.idx in bal.label_of:
                groups[(r.task,)].append(r)
        unit = "label"
    else:
        for r in kept:
            groups[("",)].append(r)
        unit = "task"
    drop_ids: set[int] = set()
    extra: list[AuditRecord] = []
    for key, rs in groups.items():
        by_class: dict[str, list[AuditRecord]] = defaultdict(list)
        for r in rs:
            by_class[bal.label_of[r.idx] if unit == "label" else (r.task or "")].append(r)
        if len(by_class) < 2:
            what = f"task {key[0]}" if unit == "label" else "the data"
            res.notes.append(f"--balance: {what} has a single {unit}; nothing to balance against")
            continue
        sizes = {c: len(v) for c, v in by_class.items()}
        lo, hi = min(sizes.values()), max(sizes.values())
        if mode == "cap":
            cap = max(1, int(lo * ratio))
            for c, v in by_class.items():
                if len(v) > cap:
                    for r in rng.sample(v, len(v) - cap):
                        drop_ids.add(r.idx)
                        res._drop(f"--balance cap: {unit} {c!r} capped at {cap}", r)
        else:
            target = max(1, int(hi / ratio))
            for c, v in by_class.items():
                need = target - len(v)
                if need > 0:
                    extra += [v[k % len(v)] for k in range(need // len(v) * len(v))] + rng.sample(v, need % len(v))
    res.added = len(extra)
    return [r for r in kept if r.idx not in drop_ids] + extra


def write_fixed(report: AuditReport, out: str | Path, balance: Optional[str] = None, seed: int = 0, balance_ratio: float = 1.0,
                review: Optional[Review] = None) -> FixResult:
    """Write the cleaned train records; return what was removed and why.

    ``review``: the reviewer's spot-check marks (``--apply-review``): ``drop`` records are left
    out, ``fix`` records are left out and written to :func:`to_fix_path` for hand correction."""
    out = Path(out)
    mapping = _outputs(report, out)
    fix_out = to_fix_path(out) if review is not None and review.fix else None
    if fix_out is not None and any(fix_out.resolve() == Path(f.path).resolve() for f in report.files):
        raise FileExistsError(f"--apply-review: refusing to overwrite the input file {fix_out}; choose another --fix path")
    records = report.records
    res = FixResult()
    dups, near, art = report.results["dups"], report.results["near"], report.results["artifacts"]
    bad = untrainable_ids(report.results["tally"])
    drop: dict[int, tuple[str, str]] = {}
    for idx, code in bad.items():
        drop[idx] = (f"cannot be trained ({code})", "")
    for idx in art.artifact_only:
        drop.setdefault(idx, ("completion is only special tokens or markers", ""))
    if review is not None:  # the reviewer's word wins over the automatic reasons
        for idx, note in review.drop.items():
            drop[idx] = ("reviewer marked drop", note)
        for idx, note in review.fix.items():
            drop[idx] = (f"reviewer marked fix (moved to {fix_out})", note)
    # Keep the first surviving member of each exact group and near-duplicate cluster.
    for group, why in [(g, "exact duplicate") for g in dups.groups] + [(c, "near-duplicate") for c in (near.clusters if near else [])]:
        alive = [i for i in group if i not in drop]
        for i in alive[1:]:
            drop[i] = (why, f"of {records[alive[0]].where}")
    train = [r for r in records if r.split == "train"]
    res.read = len(train)
    kept = []
    for r in train:
        if r.idx in drop:
            reason, detail = drop[r.idx]
            res._drop(reason, r, detail)
        else:
            kept.append(r)
    # Lines that never became records (not JSON) cannot be copied: say so.
    train_files = {f.path for f in report.files if f.split == "train"}
    for issue in report.results.get("issues", []):
        if issue.code == "invalid_json" and issue.where.rsplit(":", 1)[0] in train_files:
            res.removed["line is not valid JSON"] += 1
            res.examples.setdefault("line is not valid JSON", [])
            if len(res.examples["line is not valid JSON"]) < 5:
                res.examples["line is not valid JSON"].append(issue.where)
    if balance:
        kept = _balance(kept, report, balance, seed, balance_ratio, res)
    by_out: dict[Path, list[AuditRecord]] = defaultdict(list)
    for r in kept:
        by_out[mapping[r.path]].append(r)
    for target in dict.fromkeys(mapping.values()):
        atomic_write_jsonl(target, [r.data for r in by_out.get(target, [])])
        res.outputs.append(str(target))
    res.written = len(kept)
    if fix_out is not None:
        atomic_write_jsonl(fix_out, [r.data for r in train if r.idx in review.fix])
        res.notes.append(f"{len(review.fix)} records marked fix are in {fix_out}: correct them and add them back")
    if review is not None:
        res.notes.append(f"review {review.source}: {len(review.drop)} drop, {len(review.fix)} fix, {review.ok} ok")
    if any(f.split == "eval" for f in report.files):
        res.notes.append("eval files are not rewritten; remove leaked records from train or eval by hand if reported")
    return res
