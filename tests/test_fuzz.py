"""Fuzzed input never crashes unexplained (hypothesis, 2,200 generated cases in all).

Every reader and format detector (``read_records`` for .jsonl/.json/.csv/.parquet,
``detect_format``, ``load_dataset_file`` with every declared format, ``read_prompts`` for
``tunelab generate --file``, the audit's tolerant ``read_file``) gets random records (random and
real keys, wrong types, nested junk) written with random damage (invalid UTF-8, a BOM, CRLF, a
cut, a JSON array where JSONL is expected, an empty file), and random bytes. The outcome is a
parsed result or a ``DataError`` whose message starts with the file (``file`` or ``file:line``),
never another exception. The same for YAML config files and ``--set`` values: a
``ConfigError`` naming the file and the key, or the ``--set`` key.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.audit.reader import read_file
from tunelab.config import Config, ConfigError, describe, load_config
from tunelab.data.formats import FORMATS, DataError, detect_format, load_dataset_file, read_prompts, read_records

# the counts docs/reliability.md quotes; a run with TUNELAB_RELIABILITY_FIGURES=dir writes them
EXAMPLES = {"records": 800, "bytes": 600, "yaml": 400, "set": 400}
FIGURES = os.environ.get("TUNELAB_RELIABILITY_FIGURES")
RESULTS = {k: {"parsed": 0, "tunelab_error": 0} for k in EXAMPLES}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], derandomize=True, database=None)

KEYS = ["instruction", "input", "output", "response", "context", "category", "inputs", "targets", "prompt", "completion",
        "conversations", "messages", "text", "system", "history", "tools", "task", "from", "value", "role", "content", "tool_calls"]
ROLES = ["user", "assistant", "system", "tool", "human", "gpt", "observation", "bot"]
# text from a fixed alphabet of awkward characters (quotes, separators, NUL, a line separator,
# a surrogate-free astral emoji, a lone BOM): as hostile as any, and much faster to draw
ALPHABET = "ab Z09\n\r\t\"'\\{}[]:,;#<>|&*!%\x00\x1f\u2028\ufeffé漢🙂"
text = st.text(alphabet=ALPHABET, max_size=12)
scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | text | st.sampled_from(ROLES)
keys = st.sampled_from(KEYS) | st.text(alphabet=ALPHABET, max_size=4)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=8)
records = st.dictionaries(keys, values, max_size=5) | values
DAMAGE = ["none", "bom", "crlf", "bad_utf8", "cut", "array_in_jsonl", "empty", "blank_lines"]


def _serialize(recs: list, suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in recs).encode()
    if suffix == ".json":
        return json.dumps(recs, indent=1).encode()
    buf = io.StringIO()
    cols = sorted({str(k) for r in recs if isinstance(r, dict) for k in r} | {"text"})
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in recs:
        row = r if isinstance(r, dict) else {"text": r}
        w.writerow({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})
    return buf.getvalue().encode()


def _damage(data: bytes, how: str, pos: int, recs: list) -> bytes:
    pos = pos % (len(data) + 1)
    return {
        "none": data, "bom": b"\xef\xbb\xbf" + data, "crlf": data.replace(b"\n", b"\r\n"),
        "bad_utf8": data[:pos] + b"\xff\xc3(" + data[pos:], "cut": data[:pos], "array_in_jsonl": json.dumps(recs).encode() + b"\n",
        "empty": b"", "blank_lines": b"\n \n" + data.replace(b"\n", b"\n\n"),
    }[how]


def _assert_tunelab_error(e: DataError, path: Path) -> None:
    msg = str(e)
    assert msg.startswith(str(path)), msg
    loc = e.where[len(str(path)):]
    assert loc == "" or re.fullmatch(r":\d+", loc), e.where  # file, or file:line
    assert len(msg) > len(e.where) + 5, msg  # and says what is wrong


def _outcome(kind: str, fn, path: Path) -> None:
    try:
        fn()
        RESULTS[kind]["parsed"] += 1
    except DataError as e:
        _assert_tunelab_error(e, path)
        RESULTS[kind]["tunelab_error"] += 1


def _every_reader(kind: str, path: Path, fmt: str, on_error: str) -> None:
    def records():
        for r in read_records(path):
            if isinstance(r.data, dict):
                detect_format(set(r.data))
    _outcome(kind, records, path)
    _outcome(kind, lambda: load_dataset_file(path, "auto", on_error), path)
    _outcome(kind, lambda: load_dataset_file(path, fmt, on_error), path)
    _outcome(kind, lambda: read_prompts(path), path)
    issues: list = []
    read_file(str(path), "train", "auto", None, 0, issues)  # the audit never raises: it reports
    for i in issues:
        assert i.where.startswith(str(path)), i


@settings(max_examples=EXAMPLES["records"], **SETTINGS)
@given(recs=st.lists(records, min_size=1, max_size=3), suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
       damage=st.sampled_from(DAMAGE), pos=st.integers(0, 10**6), fmt=st.sampled_from(FORMATS), on_error=st.sampled_from(["raise", "skip"]))
def test_random_records_parse_or_fail_with_file_and_line(tmp_path, recs, suffix, damage, pos, fmt, on_error):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(_damage(_serialize(recs, suffix), damage, pos, recs))
    _every_reader("records", path, fmt, on_error)


@settings(max_examples=EXAMPLES["bytes"], **SETTINGS)
@given(prefix=st.sampled_from([b"", b'{"messages": [', b'[{"instruction": "a", "output": ', b"instruction,output\n", b"PAR1", b"\xef\xbb\xbf["]),
       data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]), fmt=st.sampled_from(FORMATS))
def test_random_bytes_parse_or_fail_with_file_and_line(tmp_path, prefix, data, suffix, fmt):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(prefix + data)
    _every_reader("bytes", path, fmt, "raise")


def test_ten_megabyte_strings_and_parquet_records_parse(tmp_path):
    big = "x" * (10 * 1024 * 1024)
    rec = {"instruction": "Repeat.", "output": big}
    for suffix in (".jsonl", ".json", ".csv"):
        path = tmp_path / f"big{suffix}"
        path.write_bytes(_serialize([rec, rec], suffix))
        ds = load_dataset_file(path)
        assert ds.format == "alpaca" and [c.messages[-1]["content"] for c in ds.conversations] == [big, big]
    pq.write_table(pa.Table.from_pylist([rec]), tmp_path / "big.parquet")
    assert load_dataset_file(tmp_path / "big.parquet").conversations[0].messages[-1]["content"] == big


def test_named_damage_gets_a_precise_message(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "b\xffad"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid UTF-8"):
        load_dataset_file(p)
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}]) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:1: .*JSON array"):
        load_dataset_file(p)
    p.write_bytes(b"\xef\xbb\xbf" + b'{"text": "bom"}\r\n{"text": "crlf"}\r\n')
    assert [c.text for c in load_dataset_file(p).conversations] == ["bom", "crlf"]
    p.write_bytes(b"")
    with pytest.raises(DataError, match=r"a\.jsonl: the (file|dataset) holds no records"):
        load_dataset_file(p)
    j = tmp_path / "b.json"
    j.write_bytes(b'[\n{"text": "a"},\n{"text": "\xc3("}\n]')
    with pytest.raises(DataError, match=r"b\.json:3: not valid UTF-8"):
        load_dataset_file(j)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl:1: JSON nested too deeply"):
        load_dataset_file(deep)


# --------------------------------------------------------------------------- config and --set

LEAVES = [k for k, default, _ in describe() if default != ""]  # dotted keys of scalar fields
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in LEAVES if "." in k})
dotted = st.sampled_from(LEAVES) | st.builds(lambda s, j: f"{s}.{j}", st.sampled_from(SECTIONS), text) | text
yaml_values = st.recursive(scalars | st.sampled_from(["auto", "off", "on", "1e-4", "top:2", "qv", "all"]),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6)


def _prefixes(key: str) -> list[str]:
    """The key and its parents, as written and as repr shows them (control characters)."""
    parts = key.split(".")
    out = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return out + [repr(p)[1:-1] for p in out]


def _nest(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@settings(max_examples=EXAMPLES["yaml"], **SETTINGS)
@given(key=dotted, value=yaml_values, damage=st.sampled_from(["none", "bom", "crlf", "bad_utf8", "cut", "tab"]), pos=st.integers(0, 10**4))
def test_random_yaml_configs_load_or_name_file_and_key(tmp_path, key, value, damage, pos):
    path = tmp_path / "cfg.yaml"
    text = yaml.safe_dump(_nest(key, value), allow_unicode=True).encode()
    if damage == "tab":
        text = text.replace(b"  ", b"\t")
    elif damage != "none":
        text = _damage(text, damage, pos, [])
    path.write_bytes(text)
    try:
        assert isinstance(load_config(path)[0], Config)
        RESULTS["yaml"]["parsed"] += 1
    except ConfigError as e:
        msg = str(e)
        assert str(path) in msg, msg
        if damage == "none" and "invalid YAML" not in msg and "top level" not in msg:
            assert any(p in msg for p in _prefixes(key)) or not key, (key, msg)
        RESULTS["yaml"]["tunelab_error"] += 1


@settings(max_examples=EXAMPLES["set"], **SETTINGS)
@given(key=dotted, raw=st.text(alphabet=ALPHABET + "-.=", max_size=16) | st.sampled_from(["[", "{a: ", "*x", "!!python/object:os.system", "&a [*a]", ": :", "'"]))
def test_random_set_values_apply_or_name_the_set_key(key, raw):
    try:
        assert isinstance(load_config(None, [f"{key}={raw}"])[0], Config)
        RESULTS["set"]["parsed"] += 1
    except ConfigError as e:
        msg = str(e)
        assert "--set" in msg or any(p in msg for p in _prefixes(key.strip())), (key, raw, msg)
        RESULTS["set"]["tunelab_error"] += 1


def test_write_fuzz_figures():
    """Runs last in this file: records the outcome counts for docs/reliability.md."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        (Path(FIGURES) / "fuzz.json").write_text(json.dumps(RESULTS, indent=1))
