"""Read dataset files and turn each record into the canonical :class:`Conversation`.

Readers keep the source line of every record (``file:line``) so that every error, audit
finding and skipped record points at the exact place to fix. Formats are detected from the
keys of the records, or declared per dataset (declared wins: behaviour should be declared,
not guessed, whenever the user knows).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .columns import apply_columns, suggest_columns

FORMATS = ("alpaca", "dolly", "flan", "sharegpt", "messages", "text")

# The keys each format needs (any one alternative set), used for detection and errors.
FORMAT_KEYS: dict[str, list[tuple[str, ...]]] = {
    "messages": [("messages",)],
    "sharegpt": [("conversations",)],
    "alpaca": [("instruction", "output")],
    "dolly": [("instruction", "response")],
    "flan": [("inputs", "targets"), ("prompt", "completion")],
    "text": [("text",)],
}
FORMAT_HELP = (
    "supported formats: alpaca {instruction, input?, output}; dolly {instruction, context?, response, category?}; "
    "flan {inputs, targets} or {prompt, completion}; sharegpt {conversations: [{from, value}]}; "
    "messages {messages: [{role, content}]}; text {text}"
)

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> canonical roles. function_call is the assistant calling a tool;
# observation is the tool's answer (LLaMA-Factory / glaive conventions).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "function_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool", "ipython": "tool",
}


class DataError(ValueError):
    """A problem in a data file; the message names file:line, what is wrong and how to fix it."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass
class Record:
    """One raw record as read from a file, with its location: ``file:line``, or for a
    Hugging Face dataset (``row=True``) ``dataset[split] row N`` with N the 0-based row index."""

    data: dict
    path: str
    line: int
    row: bool = False

    @property
    def where(self) -> str:
        return f"{self.path} row {self.line}" if self.row else f"{self.path}:{self.line}"


@dataclass
class Conversation:
    """The canonical example: a list of messages (or raw text) and an optional task tag."""

    messages: list[dict] = field(default_factory=list)  # [{"role": ..., "content": ...}]
    task: Optional[str] = None
    text: Optional[str] = None  # raw text (format "text"): every token trained, used for replay
    source: str = ""  # file:line
    id: Optional[str] = None  # the record's "id" field, when it has one
    augmented_from: Optional[str] = None  # id of the record this one was augmented from (tunelab augment)

    @property
    def group(self) -> Optional[str]:
        """The record's augmentation family: its original's id. Copies stay on one side of a split."""
        return self.augmented_from or self.id

    @property
    def is_text(self) -> bool:
        return self.text is not None


# --------------------------------------------------------------------------- readers

def _json_array_records(path: Path, text: str) -> Iterator[Record]:
    """Yield the objects of a top-level JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    i = 0
    n = len(text)
    line = 1

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip_ws(i)
    if i >= n or text[i] != "[":
        # a single object, or {"data": [...]} style wrappers
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}", f"invalid JSON ({e.msg} at column {e.colno}); fix the file or convert it to JSONL") from None
        if isinstance(obj, dict):
            for key in ("data", "records", "examples", "train"):
                if isinstance(obj.get(key), list):
                    for j, rec in enumerate(obj[key]):
                        yield Record(rec, str(path), j + 1)
                    return
            yield Record(obj, str(path), 1)
            return
        raise DataError(f"{path}:1", "expected a JSON array of records")
    pos = i + 1
    while True:
        pos = skip_ws(pos)
        if pos < n and text[pos] == "]":
            return
        line += text.count("\n", i, pos)
        i = pos
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})") from None
        yield Record(obj, str(path), line)
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos < n and text[pos] == "]":
            return
        else:
            ln = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{ln}", "expected ',' or ']' between records of the JSON array")


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield the records of a .jsonl, .json, .csv or .parquet file, each with its line."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "file not found")
    if path.is_dir():
        raise DataError(str(path), "a folder, but not one written by datasets' save_to_disk (no dataset_info.json or dataset_dict.json); point at a file or such a folder")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8", errors="strict") as fh:
            try:
                for ln, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{ln}", f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
                    yield Record(obj, str(path), ln)
            except UnicodeDecodeError as e:
                raise DataError(str(path), f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
    elif suffix == ".json":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(str(path), f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
        yield from _json_array_records(path, text)
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            start = 2
            for row in reader:
                yield Record({k: v for k, v in row.items() if k is not None}, str(path), start)
                start = reader.line_num + 1
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist()):
            yield Record(row, str(path), i + 1)  # parquet has rows, not lines: row number, 1-based
    else:
        raise DataError(str(path), f"unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


# --------------------------------------------------------------------------- detection

def detect_format(keys: set[str]) -> Optional[str]:
    """The format whose required keys are all present, or None."""
    for fmt in ("messages", "sharegpt", "alpaca", "dolly", "flan", "text"):
        for alt in FORMAT_KEYS[fmt]:
            if all(k in keys for k in alt):
                return fmt
    return None


def _unknown_format(rec: Record, fmt: Optional[str] = None) -> DataError:
    keys = sorted(rec.data) if isinstance(rec.data, dict) else type(rec.data).__name__
    what = f"record does not match format {fmt!r}" if fmt else "unknown record format"
    hint = suggest_columns(rec.data)
    fix = f"map your columns on the dataset, e.g. `{hint}`" if hint else "map your columns on the dataset (`columns: {prompt: COL, completion: COL}`)"
    return DataError(rec.where, f"{what}; keys seen: {keys}; {FORMAT_HELP}. Set `format:`, or {fix}.")


# --------------------------------------------------------------------------- conversion

def _text(rec: Record, key: str, required: bool = True) -> str:
    v = rec.data.get(key)
    if v is None:
        if required:
            raise DataError(rec.where, f"missing field {key!r} (keys seen: {sorted(rec.data)})")
        return ""
    if not isinstance(v, str):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        raise DataError(rec.where, f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p and p.strip())


def to_conversation(rec: Record, fmt: str, default_task: Optional[str] = None) -> Conversation:
    """Convert one record of a known format to a Conversation; DataError if malformed."""
    d = rec.data
    if not isinstance(d, dict):
        raise DataError(rec.where, f"expected a JSON object, got {type(d).__name__}")
    if not any(all(k in d for k in alt) for alt in FORMAT_KEYS[fmt]):
        raise _unknown_format(rec, fmt)
    task = d.get("task") or d.get("category") or default_task
    ids = {k: str(d[k]) for k in ("id", "augmented_from") if isinstance(d.get(k), (str, int)) and not isinstance(d.get(k), bool)}
    msgs: list[dict] = []
    if fmt == "text":
        text = _text(rec, "text")
        if not text.strip():
            raise DataError(rec.where, "empty text")
        return Conversation(text=text, task=str(task) if task else None, source=rec.where, **ids)
    if fmt == "alpaca":
        if d.get("system"):
            msgs.append({"role": "system", "content": _text(rec, "system")})
        for turn in d.get("history") or []:  # LLaMA-Factory alpaca: [[user, assistant], ...]
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise DataError(rec.where, "history must be a list of [user, assistant] pairs")
            msgs += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
        msgs.append({"role": "user", "content": _join(_text(rec, "instruction"), _text(rec, "input", False))})
        msgs.append({"role": "assistant", "content": _text(rec, "output")})
    elif fmt == "dolly":
        msgs.append({"role": "user", "content": _join(_text(rec, "instruction"), _text(rec, "context", False))})
        msgs.append({"role": "assistant", "content": _text(rec, "response")})
    elif fmt == "flan":
        if "inputs" in d:
            prompt, completion = _text(rec, "inputs"), _text(rec, "targets")
        else:
            prompt, completion = _text(rec, "prompt"), _text(rec, "completion")
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif fmt == "sharegpt":
        turns = d["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError(rec.where, "'conversations' must be a non-empty list of {from, value}")
        system = d.get("system") or ""
        tools = d.get("tools")
        if tools:
            tools_text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
            system = _join(system, "You have access to the following tools:\n" + tools_text)
        if system:
            msgs.append({"role": "system", "content": system})
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise DataError(rec.where, f"conversations[{j}] must be {{from, value}}, got {t!r:.80}")
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise DataError(rec.where, f"conversations[{j}]: unknown speaker {t['from']!r}; use one of {sorted(SHAREGPT_ROLES)}")
            if not isinstance(t["value"], str):
                raise DataError(rec.where, f"conversations[{j}].value must be a string")
            msgs.append({"role": role, "content": t["value"]})
    elif fmt == "messages":
        turns = d["messages"]
        if not isinstance(turns, list) or not turns:
            raise DataError(rec.where, "'messages' must be a non-empty list of {role, content}")
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or "role" not in t:
                raise DataError(rec.where, f"messages[{j}] must be {{role, content}}")
            role = t["role"]
            if role not in ROLES:
                raise DataError(rec.where, f"messages[{j}]: unknown role {role!r}; use one of {list(ROLES)}")
            content = t.get("content")
            if content is None and t.get("tool_calls"):
                content = json.dumps(t["tool_calls"], ensure_ascii=False)
            if not isinstance(content, str):
                raise DataError(rec.where, f"messages[{j}].content must be a string")
            msgs.append({"role": role, "content": content})
    else:
        raise ValueError(f"unknown format {fmt}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(rec.where, "no assistant turn: nothing to train on")
    for m in msgs:
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(rec.where, "empty assistant completion; remove the record or fill it in")
    return Conversation(messages=msgs, task=str(task) if task else None, source=rec.where, **ids)


@dataclass
class LoadedDataset:
    conversations: list[Conversation]
    format: str
    path: str
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for on_error=skip


def load_dataset_file(path: str | Path, fmt: str = "auto", on_error: str = "raise", task: Optional[str] = None,
                      columns: Optional[dict[str, str]] = None) -> LoadedDataset:
    """Read a file into Conversations. ``fmt='auto'`` detects it from the first record."""
    path = Path(path)
    return convert_records(read_records(path), str(path), fmt, on_error, task or path.stem, columns)


def convert_records(records: Iterable[Record], source: str, fmt: str = "auto", on_error: str = "raise",
                    default_task: Optional[str] = None, columns: Optional[dict[str, str]] = None) -> LoadedDataset:
    """Records (of a file or a Hugging Face dataset) -> Conversations, columns mapped first.
    ``fmt='auto'`` detects the format from the first record."""
    convs: list[Conversation] = []
    skipped: list[str] = []
    resolved = None if fmt == "auto" else fmt
    for rec in records:
        if columns:
            mapped, problem = apply_columns(rec.data, columns)
            if problem:
                if on_error == "raise":
                    raise DataError(rec.where, problem + "; fix data.columns")
                skipped.append(f"{rec.where}: {problem}")
                continue
            rec = Record(mapped, rec.path, rec.line, rec.row)
        if resolved is None:
            if not isinstance(rec.data, dict) or (found := detect_format(set(rec.data))) is None:
                raise _unknown_format(rec)
            resolved = found
        try:
            convs.append(to_conversation(rec, resolved, default_task))
        except DataError as e:
            if on_error == "raise":
                raise DataError(e.where, str(e)[len(e.where) + 2:] + " (set data.on_error: skip to skip bad records)") from None
            skipped.append(str(e))
    if resolved is None:
        raise DataError(source, "the dataset holds no records" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return LoadedDataset(convs, resolved, source, skipped)
