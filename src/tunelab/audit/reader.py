"""Read data files record by record, tolerating bad lines, so the audit can report them all.

``tunelab.data.formats.read_records`` stops at the first invalid line, which is right for
training but not for an audit: the audit reports *every* invalid JSON line and every line
that is not valid UTF-8 (as ``file:line``) and keeps reading.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data import formats as _formats
from ..data.formats import Conversation, DataError, read_records


@dataclass(eq=False)
class AuditRecord:
    """One record of one file, with what the audit derived from it."""

    idx: int  # position in the audit's record list
    path: str
    line: int
    split: str  # "train" or "eval"
    data: Any  # the original object, written back unchanged by --fix
    fmt: Optional[str] = None  # the format the record was converted with
    conv: Optional[Conversation] = None  # None when the record could not be converted
    task: Optional[str] = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Issue:
    """A problem found while reading, before any record exists (bad JSON, bad bytes)."""

    where: str
    code: str  # invalid_json | invalid_utf8 | file_unreadable
    message: str


@dataclass
class FileInfo:
    path: str
    split: str
    declared_format: str = "auto"
    format: Optional[str] = None  # declared, or detected from the first record
    task: Optional[str] = None  # default task tag (dataset name or file stem)
    records: int = 0  # records read (objects or not)
    converted: int = 0  # records that became a Conversation
    formats: Counter = field(default_factory=Counter)  # per-record detected format -> count
    field_sets: Counter = field(default_factory=Counter)  # tuple(sorted keys) -> count
    error: Optional[str] = None  # a file-level problem (unreadable, invalid JSON array)
    bad_utf8_lines: set = field(default_factory=set)
    issues: int = 0  # reading problems reported for this file

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "split": self.split,
            "format": self.format,
            "declared_format": self.declared_format,
            "task": self.task,
            "records": self.records,
            "converted": self.converted,
            "formats": {str(k): v for k, v in self.formats.most_common()},
            "field_sets": [{"fields": list(k), "records": v} for k, v in self.field_sets.most_common(10)],
            "error": self.error,
        }


def _jsonl(path: Path, issues: list[Issue], info: FileInfo):
    """Yield (line, object) for each parseable line; report bad lines and keep going."""
    with open(path, "rb") as fh:
        for ln, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                issues.append(Issue(f"{path}:{ln}", "invalid_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)"))
                info.bad_utf8_lines.add(ln)
                text = raw.decode("utf-8", errors="replace")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                issues.append(Issue(f"{path}:{ln}", "invalid_json", f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            yield ln, obj


def _bad_utf8_lines(data: bytes) -> list[tuple[int, str]]:
    out = []
    for ln, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((ln, f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)"))
    return out


def _json(path: Path, issues: list[Issue], info: FileInfo):
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        for ln, msg in _bad_utf8_lines(data):
            issues.append(Issue(f"{path}:{ln}", "invalid_utf8", msg))
            info.bad_utf8_lines.add(ln)
        text = data.decode("utf-8", errors="replace")
    # The array reader of tunelab.data.formats keeps each record's starting line; it is
    # reused here on the (possibly repaired) text so that line numbers agree with training.
    for rec in _formats._json_array_records(path, text):
        yield rec.line, rec.data


def read_file(path: str, split: str, declared_format: str, task: Optional[str], start_idx: int,
              issues: list[Issue]) -> tuple[FileInfo, list[AuditRecord]]:
    """Read one file into AuditRecords (unconverted); problems go to ``issues``."""
    p = Path(path)
    info = FileInfo(path=str(p), split=split, declared_format=declared_format, task=task or p.stem)
    records: list[AuditRecord] = []
    before = len(issues)
    suffix = p.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            it = _jsonl(p, issues, info)
        elif suffix == ".json":
            it = _json(p, issues, info)
        else:  # csv, parquet and anything else: the training reader (it names the problem)
            it = ((r.line, r.data) for r in read_records(p))
        for ln, obj in it:
            records.append(AuditRecord(start_idx + len(records), str(p), ln, split, obj))
    except DataError as e:
        # A file-level failure (unreadable file, broken JSON array): records read before it
        # are still audited; the rest of the file cannot be.
        info.error = str(e)
        code = "invalid_json" if "JSON" in str(e) else ("invalid_utf8" if "UTF-8" in str(e) else "file_unreadable")
        issues.append(Issue(e.where, code, str(e)[len(e.where) + 2:] if str(e).startswith(e.where) else str(e)))
    except OSError as e:
        info.error = f"{p}: {e.strerror or e}"
        issues.append(Issue(str(p), "file_unreadable", f"cannot read the file ({e.strerror or e})"))
    info.records = len(records)
    info.issues = sum(1 for i in issues[before:])
    return info, records
