"""Schema checks: the format of each file and, per record, missing, empty or non-string
fields, empty completions, control characters and invalid UTF-8, each as ``file:line``.

Records are converted with the training code's own ``to_conversation`` so that "passes the
audit" and "loads for training" mean the same thing; the field-level checks here only make
its first error more specific and find *all* problems rather than the first.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

from ..data.formats import FORMAT_KEYS, DataError, Record, detect_format, to_conversation
from .findings import ERROR, WARNING, FindingList, Tally
from .reader import AuditRecord, FileInfo, Issue

SECTION = "schema"

# Which field is the completion (trained) and which are the prompt, per flat format.
COMPLETION_FIELD = {"alpaca": "output", "dolly": "response", "text": "text", ("flan", "inputs"): "targets", ("flan", "prompt"): "completion"}
PROMPT_FIELD = {"alpaca": "instruction", "dolly": "instruction", ("flan", "inputs"): "inputs", ("flan", "prompt"): "prompt"}
OPTIONAL_TEXT = {"alpaca": ("input", "system"), "dolly": ("context",), "sharegpt": ("system",)}

# C0/C1 control characters other than tab, newline and carriage return; lone surrogates
# (JSON "\ud800" escapes: not encodable as UTF-8); U+FFFD (text decoded from bad bytes upstream).
_SUSPECT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")

FIXES = {
    "invalid_json": "Fix or delete the line; each JSONL line must be one JSON object.",
    "invalid_utf8": "Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or drop the record.",
    "file_unreadable": "Check the path and the file type (.jsonl, .json, .csv, .parquet).",
    "not_an_object": "Each record must be a JSON object with the fields of one format.",
    "unknown_format": "Rename the keys to one supported format or declare `format:` for the dataset.",
    "format_mismatch": "Use one format per file, or split the file by format.",
    "missing_field": "Add the field, or drop the record (--fix drops records that cannot be trained).",
    "non_string_field": "Make the field a string (JSON text); lists and objects are not text.",
    "numeric_field": "Store numbers as strings if they are meant as text; they are converted to text on load.",
    "empty_field": "Fill in the prompt field or drop the record.",
    "empty_completion": "Fill in the completion or drop the record (--fix drops it).",
    "unconvertible_record": "Fix the record as the message says, or drop it (--fix drops it).",
    "control_characters": "Remove the control characters (e.g. re.sub(r'[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f]', '', s)).",
    "replacement_character": "The text was decoded from bad bytes upstream (U+FFFD); re-export it from the source as UTF-8.",
    "empty_file": "Point the dataset at a file with records (training refuses an empty file).",
}
SEVERITY = {
    "invalid_json": ERROR, "invalid_utf8": ERROR, "file_unreadable": ERROR, "not_an_object": ERROR,
    "unknown_format": ERROR, "format_mismatch": ERROR, "missing_field": ERROR, "non_string_field": ERROR,
    "numeric_field": WARNING, "empty_field": WARNING, "empty_completion": ERROR, "unconvertible_record": ERROR,
    "control_characters": WARNING, "replacement_character": WARNING, "empty_file": ERROR,
}
MESSAGES = {
    "invalid_json": "lines that are not valid JSON",
    "invalid_utf8": "records that are not valid UTF-8",
    "file_unreadable": "files that could not be read",
    "not_an_object": "records that are not JSON objects",
    "unknown_format": "records of no supported format",
    "format_mismatch": "records in a different format from the rest of their file",
    "missing_field": "records with a missing (or null) required field",
    "non_string_field": "records with a field that is not a string",
    "numeric_field": "records with a number where text is expected",
    "empty_field": "records with an empty prompt field",
    "empty_completion": "records with an empty completion",
    "unconvertible_record": "records the training loader rejects",
    "control_characters": "records with control characters in their text",
    "replacement_character": "records with U+FFFD replacement characters (text decoded from bad bytes)",
    "empty_file": "files that hold no records",
}
# Record-level problems that make a record untrainable: --fix drops these records.
UNTRAINABLE = ("not_an_object", "unknown_format", "format_mismatch", "missing_field", "non_string_field",
               "empty_completion", "unconvertible_record", "invalid_utf8")


def _alt(fmt: str, d: dict) -> tuple[str, ...]:
    """The key set of ``fmt`` this record uses (the first alternative when none matches)."""
    alts = FORMAT_KEYS[fmt]
    for alt in alts:
        if all(k in d for k in alt):
            return alt
    return alts[0]


def _flat_key(fmt: str, alt: tuple[str, ...]) -> Any:
    return (fmt, alt[0]) if fmt == "flan" else fmt


def _check_value(tally: Tally, rec: AuditRecord, key: str, value: Any, completion: bool, required: bool) -> None:
    if value is None:
        if required:
            tally.hit("missing_field", rec.where, repr(key), rec.idx)
        return
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        tally.hit("non_string_field", rec.where, f"{key!r}: {type(value).__name__}", rec.idx)
        return
    if not isinstance(value, str):
        tally.hit("numeric_field", rec.where, repr(key), rec.idx)
        return
    if required and not value.strip():
        if completion:
            tally.hit("empty_completion", rec.where, repr(key), rec.idx)
        else:
            tally.hit("empty_field", rec.where, repr(key), rec.idx)


def _check_turns(tally: Tally, rec: AuditRecord, turns: Any, key: str, role_key: str, text_key: str) -> None:
    if not isinstance(turns, list) or not turns:
        tally.hit("non_string_field", rec.where, f"{key!r} must be a non-empty list", rec.idx)
        return
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            tally.hit("non_string_field", rec.where, f"{key}[{j}] is not an object", rec.idx)
            return
        role = str(t.get(role_key, "")).lower()
        value = t.get(text_key)
        if value is None and role_key == "role" and t.get("tool_calls"):
            continue  # an assistant turn that only calls tools
        assistant = role in ("assistant", "gpt", "model", "chatgpt", "bing", "function_call")
        label = f"{key}[].{text_key}"
        if value is None:
            tally.hit("missing_field", rec.where, repr(label), rec.idx)
        elif not isinstance(value, str):
            tally.hit("non_string_field", rec.where, f"{label!r}: {type(value).__name__}", rec.idx)
        elif not value.strip():
            tally.hit("empty_completion" if assistant else "empty_field", rec.where, repr(label), rec.idx)


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _check_text(tally: Tally, rec: AuditRecord, bad_utf8: bool) -> None:
    if rec.conv is None:
        texts = list(_strings(rec.data))
    elif rec.conv.is_text:
        texts = [rec.conv.text]
    else:
        texts = [m["content"] for m in rec.conv.messages]
    found = set()
    controls: set[str] = set()
    for s in texts:
        for m in _SUSPECT.finditer(s):
            c = m.group()
            if "\ud800" <= c <= "\udfff":
                found.add("invalid_utf8")
            elif c == "\ufffd":
                found.add("replacement_character")
            else:
                found.add("control_characters")
                controls.add(f"U+{ord(c):04X}")
    if bad_utf8:  # already reported by the reader; its U+FFFD are the repair, not a new problem
        found.discard("replacement_character")
        found.discard("invalid_utf8")
    for code in sorted(found):
        detail = {"invalid_utf8": "lone surrogate (\\ud800-\\udfff escape)",
                  "control_characters": " ".join(sorted(controls)[:3])}.get(code)
        tally.hit(code, rec.where, detail, rec.idx)


def _untrainable(tally: Tally, idx: int) -> bool:
    return any(idx in tally.ids.get(c, ()) for c in UNTRAINABLE)


def check_and_convert(records: list[AuditRecord], info: FileInfo, tally: Tally) -> None:
    """Detect the file's format, check each record's fields, convert it (sets rec.conv)."""
    if not records and info.error is None and not info.issues:
        tally.hit("empty_file", f"{info.path}:1", info.path)
    fmt: Optional[str] = None if info.declared_format == "auto" else info.declared_format
    for rec in records:
        d = rec.data
        if isinstance(d, dict):
            info.field_sets[tuple(sorted(map(str, d)))] += 1
            own = detect_format(set(d))
            info.formats[own or "unknown"] += 1
            if fmt is None and own is not None:
                fmt = own  # like training: the first record decides the file's format
    info.format = fmt
    for rec in records:
        d = rec.data
        if not isinstance(d, dict):
            tally.hit("not_an_object", rec.where, type(d).__name__, rec.idx)
            continue
        bad_utf8 = rec.line in info.bad_utf8_lines
        if bad_utf8:
            tally.ids.setdefault("invalid_utf8", set()).add(rec.idx)
        if fmt is None:
            tally.hit("unknown_format", rec.where, ", ".join(sorted(map(str, d)))[:80] or "no keys", rec.idx)
            _check_text(tally, rec, bad_utf8)
            continue
        if not any(all(k in d for k in alt) for alt in FORMAT_KEYS[fmt]):
            own = detect_format(set(d))
            if own is not None:
                tally.hit("format_mismatch", rec.where, f"{own} in a {fmt} file", rec.idx)
            else:
                missing = [k for k in _alt(fmt, d) if k not in d]
                for k in missing:
                    tally.hit("missing_field", rec.where, repr(k), rec.idx)
            _check_text(tally, rec, bad_utf8)
            continue
        alt = _alt(fmt, d)
        if fmt in ("sharegpt", "messages"):
            if fmt == "sharegpt":
                _check_turns(tally, rec, d.get("conversations"), "conversations", "from", "value")
            else:
                _check_turns(tally, rec, d.get("messages"), "messages", "role", "content")
        else:
            key = _flat_key(fmt, alt)
            _check_value(tally, rec, COMPLETION_FIELD[key], d.get(COMPLETION_FIELD[key]), completion=True, required=True)
            if key in PROMPT_FIELD:
                _check_value(tally, rec, PROMPT_FIELD[key], d.get(PROMPT_FIELD[key]), completion=False, required=True)
        for opt in OPTIONAL_TEXT.get(fmt, ()):
            if opt in d:
                _check_value(tally, rec, opt, d.get(opt), completion=False, required=False)
        try:
            rec.conv = to_conversation(Record(d, rec.path, rec.line), fmt, info.task)
            rec.fmt = fmt
            rec.task = rec.conv.task
        except DataError as e:
            if not _untrainable(tally, rec.idx):  # not yet explained by a field check
                msg = str(e)[len(e.where) + 2:] if str(e).startswith(e.where) else str(e)
                tally.hit("unconvertible_record", rec.where, msg.split(";")[0][:100], rec.idx)
            else:
                tally.ids.setdefault("unconvertible_record", set()).add(rec.idx)
        _check_text(tally, rec, bad_utf8)
    info.converted = sum(1 for r in records if r.conv is not None)


def issues_to_tally(issues: list[Issue], tally: Tally) -> None:
    for i in issues:
        # "invalid JSON (Expecting value at column 3)" -> "Expecting value": groups alike errors
        m = re.search(r"\((.*?)(?: at (?:column|byte) \d+.*)?\)", i.message)
        tally.hit(i.code, i.where, m.group(1) if m and i.code != "file_unreadable" else i.message)


def findings(tally: Tally) -> FindingList:
    out = FindingList()
    for code, n in tally.count.items():
        if code not in SEVERITY:
            continue
        what = tally.breakdown(code)
        out.add(code, SEVERITY[code], f"{n} {MESSAGES[code]}" + (f": {what}" if what else ""), n,
                tally.examples.get(code, []), FIXES[code], SECTION)
    return out


def untrainable_ids(tally: Tally) -> dict[int, str]:
    """record idx -> the reason it cannot be trained (what --fix drops for schema reasons)."""
    out: dict[int, str] = {}
    for code in UNTRAINABLE:
        for idx in tally.ids.get(code, ()):
            out.setdefault(idx, code)
    return out


