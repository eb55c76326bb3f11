"""``--apply-review marks.csv``: the reviewer's spot-check marks, applied by ``--fix OUT``.

The spot-check page exports ``spotcheck-marks.csv`` with the columns ``n, record, mark, note``
(``record`` is ``FILE:LINE``, ``mark`` is ``ok``, ``fix``, ``drop`` or empty). ``drop``: the
record is left out of the cleaned copy. ``fix``: it is left out too, and written unchanged to
``<OUT>.to-fix.jsonl`` (with the reviewer's notes printed), to be corrected by hand and put
back. ``ok`` and empty marks change nothing. A mark naming a record that is not in the audited
data, or an unknown mark, is an error (file:line): marks meant for other data must not
silently apply to nothing.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.formats import DataError
from .reader import AuditRecord

MARKS = ("ok", "fix", "drop", "")


@dataclass
class Review:
    drop: dict[int, str] = field(default_factory=dict)  # record idx -> note
    fix: dict[int, str] = field(default_factory=dict)
    ok: int = 0
    source: str = ""


def _key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def read_review(marks_path: str | Path, records: list[AuditRecord]) -> Review:
    """Match each mark of ``marks_path`` to an audited train record (by file and line)."""
    marks_path = Path(marks_path)
    if not marks_path.is_file():
        raise DataError(str(marks_path), "--apply-review: marks file not found (export it from the spot-check page)")
    by_where = {(_key(r.path), r.line): r for r in records if r.split == "train"}
    by_name: dict[tuple[str, int], list[AuditRecord]] = {}
    for r in records:
        if r.split == "train":
            by_name.setdefault((Path(r.path).name, r.line), []).append(r)
    review = Review(source=str(marks_path))
    with open(marks_path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip().lower() for c in rows[0][:3]] != ["n", "record", "mark"]:
        raise DataError(f"{marks_path}:1", "expected the header n,record,mark,note (the spot-check page's export)")
    for ln, row in enumerate(rows[1:], 2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < 3:
            raise DataError(f"{marks_path}:{ln}", f"expected n,record,mark,note, got {row!r}")
        where, mark = row[1].strip(), row[2].strip().lower()
        note = row[3].strip() if len(row) > 3 else ""
        if mark not in MARKS:
            raise DataError(f"{marks_path}:{ln}", f"mark {mark!r} is not one of ok, fix, drop (or empty)")
        path, _, line = where.rpartition(":")
        if not path or not line.isdigit():
            raise DataError(f"{marks_path}:{ln}", f"record {where!r} is not FILE:LINE")
        rec = by_where.get((_key(path), int(line)))
        if rec is None:  # exported from another folder: the file name and line, if unambiguous
            same = by_name.get((Path(path).name, int(line)), [])
            rec = same[0] if len(same) == 1 else None
        if rec is None:
            raise DataError(f"{marks_path}:{ln}", f"record {where} is not among the audited train records; "
                                                  "apply the marks to the data the spot check was made from")
        if mark == "drop":
            review.drop[rec.idx] = note
        elif mark == "fix":
            review.fix[rec.idx] = note
        elif mark == "ok":
            review.ok += 1
    return review


def to_fix_path(out: str | Path) -> Path:
    """Where ``fix``-marked records go: ``OUT.to-fix.jsonl`` (OUT a .jsonl file) or ``OUT/to-fix.jsonl``."""
    out = Path(out)
    if out.suffix.lower() in (".jsonl", ".ndjson"):
        return out.with_name(out.stem + ".to-fix.jsonl")
    return out / "to-fix.jsonl"
