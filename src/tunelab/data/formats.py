"""Read dataset files and turn each record into the canonical :class:`Conversation`.

Readers keep the source line of every record (``file:line``) so that every error, audit
finding and skipped record points at the exact place to fix. Formats are detected from the
keys of the records, or declared per dataset (declared wins: behaviour should be declared,
not guessed, whenever the user knows).
"""

from __future__ import annotations

import csv
import io
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
    if i >= n:
        return  # an empty file: no records (load_dataset_file says so)
    if text[i] != "[":
        # a single object, or {"data": [...]} style wrappers
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":
                raise DataError(f"{path}:{e.lineno}", "more than one JSON value: a file of one object per line is JSONL; name it .jsonl") from None
            raise DataError(f"{path}:{e.lineno}", f"invalid JSON ({e.msg} at column {e.colno}); fix the file or convert it to JSONL") from None
        except RecursionError:
            raise DataError(f"{path}:1", "JSON nested too deeply to read") from None
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
        except RecursionError:
            raise DataError(f"{path}:{line}", "JSON nested too deeply to read") from None
        yield Record(obj, str(path), line)
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos < n and text[pos] == "]":
            return
        else:
            ln = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{ln}", "expected ',' or ']' between records of the JSON array")


BOM = b"\xef\xbb\xbf"


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 (a leading BOM dropped); bad bytes are an error naming file:line."""
    try:
        return data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        start = e.start + (len(BOM) if data.startswith(BOM) else 0)
        line = data.count(b"\n", 0, start) + 1
        raise DataError(f"{path}:{line}", f"not valid UTF-8 ({e.reason} at byte {start}); re-encode the file as UTF-8") from None


def _jsonl_records(path: Path) -> Iterator[Record]:
    with open(path, "rb") as fh:
        for ln, raw in enumerate(fh, start=1):
            if ln == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{ln}", f"not valid UTF-8 ({e.reason} at byte {e.start} of the line); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                hint = ("; the file looks like one JSON array: name it .json" if ln == 1 and line.lstrip().startswith("[")
                        else "; each line must be one JSON object")
                raise DataError(f"{path}:{ln}", f"invalid JSON ({e.msg} at column {e.colno}){hint}") from None
            except RecursionError:
                raise DataError(f"{path}:{ln}", "JSON nested too deeply to read") from None
            yield Record(obj, str(path), ln)


def _csv_records(path: Path) -> Iterator[Record]:
    text = _decode(path, path.read_bytes())
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long completions are normal
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2
    try:
        for row in reader:
            yield Record({k: v for k, v in row.items() if k is not None}, str(path), start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}", f"invalid CSV ({e})") from None


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, ValueError) as e:
        raise DataError(str(path), f"not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
    for i, row in enumerate(rows):
        yield Record(row, str(path), i + 1)  # parquet has rows, not lines: row number, 1-based


SUPPORTED_INPUTS = "a local .jsonl, .json, .csv or .parquet file, or a folder written by datasets' save_to_disk"


def not_a_file_message(path: Path) -> str:
    """What to say when a dataset path is not a file: a folder, a hub dataset id, a typo."""
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv", ".parquet"))[:5]
        return (f"a folder, but not one written by datasets' save_to_disk (no dataset_info.json or dataset_dict.json); "
                f"a dataset entry takes {SUPPORTED_INPUTS}"
                + (f", e.g. {path / files[0]} (data files here: {', '.join(files)})" if files else ""))
    s = str(path)
    if s.count("/") == 1 and not path.suffix and not s.startswith((".", "/", "~")):
        return (f"not a file; it looks like a Hugging Face dataset id: write the entry as {{hub: {s}}} (read from the "
                f"local HF cache, never downloaded; fetch it once where the hub is reachable with: hf download {s} --repo-type dataset), "
                f"or give {SUPPORTED_INPUTS} ({FORMAT_HELP})")
    return f"file not found; a dataset entry takes {SUPPORTED_INPUTS} (a relative path is taken from the config file's folder)"


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield the records of a .jsonl, .json, .csv or .parquet file, each with its line.

    Any problem with the file is a :class:`DataError` naming ``file:line``: bad bytes, bad
    JSON or CSV, nesting too deep, a file that cannot be read. A leading UTF-8 BOM and CRLF
    line ends are accepted. The records themselves are checked by :func:`to_conversation`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), not_a_file_message(path))
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl_records, ".ndjson": _jsonl_records, ".json": lambda p: _json_array_records(p, _decode(p, p.read_bytes())),
               ".csv": _csv_records, ".parquet": _parquet_records}
    if suffix not in readers:
        raise DataError(str(path), f"unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    try:
        yield from readers[suffix](path)
    except OSError as e:
        raise DataError(str(path), f"cannot read the file ({e.strerror or e})") from None


# --------------------------------------------------------------------------- detection

def detect_format(keys: set[str]) -> Optional[str]:
    """The format whose required keys are all present, or None."""
    for fmt in ("messages", "sharegpt", "alpaca", "dolly", "flan", "text"):
        for alt in FORMAT_KEYS[fmt]:
            if all(k in keys for k in alt):
                return fmt
    return None


def _unknown_format(rec: Record, fmt: Optional[str] = None) -> DataError:
    if not isinstance(rec.data, dict):
        hint = " (a JSON array where one object per line was expected? a file holding one array is .json)" if isinstance(rec.data, list) else ""
        return DataError(rec.where, f"expected a JSON object (a record), got {type(rec.data).__name__}{hint}; {FORMAT_HELP}")
    keys = sorted(map(str, rec.data))
    what = f"record does not match format {fmt!r}" if fmt else "unknown record format"
    hint = suggest_columns(rec.data)
    fix = f"map your columns on the dataset, e.g. `{hint}`" if hint else "map your columns on the dataset (`columns: {prompt: COL, completion: COL}`)"
    return DataError(rec.where, f"{what}; keys seen: {keys}; {FORMAT_HELP}. Set `format:`, or {fix}.")


# --------------------------------------------------------------------------- conversion

def _text(rec: Record, key: str, required: bool = True) -> str:
    v = rec.data.get(key)
    if v is None:
        if required:
            raise DataError(rec.where, f"missing field {key!r} (keys seen: {sorted(map(str, rec.data))})")
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
        raise _unknown_format(rec, fmt)
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
        history = d.get("history") or []
        if not isinstance(history, list):
            raise DataError(rec.where, "history must be a list of [user, assistant] pairs")
        for turn in history:  # LLaMA-Factory alpaca: [[user, assistant], ...]
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
        system = _text(rec, "system", False)
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
        msgs += message_list(rec)
    else:
        raise ValueError(f"unknown format {fmt}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(rec.where, "no assistant turn: nothing to train on")
    for m in msgs:
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(rec.where, "empty assistant completion; remove the record or fill it in")
    return Conversation(messages=msgs, task=str(task) if task else None, source=rec.where, **ids)


def message_list(rec: Record) -> list[dict]:
    """The checked ``messages`` of a messages-format record: [{role, content}], roles known."""
    turns = rec.data["messages"]
    if not isinstance(turns, list) or not turns:
        raise DataError(rec.where, "'messages' must be a non-empty list of {role, content}")
    msgs = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t:
            raise DataError(rec.where, f"messages[{j}] must be {{role, content}}")
        role = t["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(rec.where, f"messages[{j}]: unknown role {role!r:.80}; use one of {list(ROLES)}")
        content = t.get("content")
        if content is None and t.get("tool_calls"):
            content = json.dumps(t["tool_calls"], ensure_ascii=False)
        if not isinstance(content, str):
            raise DataError(rec.where, f"messages[{j}].content must be a string")
        msgs.append({"role": role, "content": content})
    return msgs


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts for generation: ``{prompt}`` records, or any supported format with its final
    assistant turn(s) removed. Errors name file:line like every reader's."""
    convs = []
    for rec in read_records(path):
        d = rec.data
        if isinstance(d, dict) and "prompt" in d and "completion" not in d:
            convs.append([{"role": "user", "content": _text(rec, "prompt")}])
            continue
        fmt = detect_format(set(map(str, d))) if isinstance(d, dict) else None
        if fmt is None:
            raise DataError(rec.where, f"expected {{prompt}} or a supported record format, keys seen: "
                                       f"{sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__}")
        msgs = message_list(rec) if fmt == "messages" else to_conversation(rec, fmt).messages
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise DataError(rec.where, "no prompt: the record holds only assistant turns")
        convs.append(msgs)
    return convs


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
            if not isinstance(rec.data, dict) or (found := detect_format(set(map(str, rec.data)))) is None:
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
