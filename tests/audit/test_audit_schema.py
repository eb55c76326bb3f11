"""Schema: formats per file, and every malformed record reported as file:line."""

from __future__ import annotations

import json

from audit_helpers import alpaca, audit, write_jsonl


def test_every_bad_record_is_reported_with_its_line(tmp_path):
    rows = [
        alpaca("Say hi.", "Hi!"),                                    # 1 fine
        '{"instruction": "broken", "output": ',                      # 2 invalid JSON
        b'{"instruction": "caf\xe9", "output": "ok"}',               # 3 invalid UTF-8 (latin-1 byte)
        {"instruction": "No output here."},                          # 4 missing field (no format matches)
        alpaca("Empty answer.", "   "),                               # 5 empty completion
        {"instruction": "List?", "input": "", "output": ["a", "b"]},  # 6 non-string completion
        alpaca("Count.", 3),                                          # 7 a number: converted, warned
        alpaca("Bell\x07 here.", "Ding."),                            # 8 control character
        '{"instruction": "Bad \\ud800 escape", "input": "", "output": "x"}',  # 9 lone surrogate
        '["not", "an", "object"]',                                    # 10 not an object
        {"prompt": "Q?", "completion": "A."},                        # 11 another format in an alpaca file
        alpaca("", "Answer without a question."),                     # 12 empty prompt field
        {"instruction": None, "input": "", "output": "x"},            # 13 null prompt field
    ]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    rep = audit([f])
    by = {x.code: x for x in rep.findings}
    where = lambda n: f"{f}:{n}"  # noqa: E731
    expect = {
        "invalid_json": (2, "error"), "invalid_utf8": (3, "error"), "missing_field": (4, "error"),
        "empty_completion": (5, "error"), "non_string_field": (6, "error"), "numeric_field": (7, "warning"),
        "control_characters": (8, "warning"), "not_an_object": (10, "error"), "format_mismatch": (11, "error"),
        "empty_field": (12, "warning"),
    }
    for code, (line, sev) in expect.items():
        assert code in by, (code, sorted(by))
        assert by[code].severity == sev, code
        assert where(line) in by[code].examples, (code, by[code].examples)
        assert by[code].fix
    # the lone surrogate is invalid UTF-8 too, and the null field is a missing one
    assert where(9) in by["invalid_utf8"].examples
    assert where(13) in by["missing_field"].examples
    assert rep.files[0].format == "alpaca"
    assert rep.exit_code == 1
    # the good record converted; records 2 and 10 never became records at all
    assert rep.files[0].converted >= 2


def test_formats_are_detected_per_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [alpaca("Hi?", "Hello.")])
    b = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}])
    d = tmp_path / "d.json"
    d.write_text(json.dumps([{"inputs": "2+2?", "targets": "4"}, {"inputs": "3+3?", "targets": "6"}], indent=2))
    e = write_jsonl(tmp_path / "e.jsonl", [{"text": "Plain text for replay."}])
    rep = audit([a, b, c, d, e])
    assert [fi.format for fi in rep.files] == ["alpaca", "sharegpt", "messages", "flan", "text"]
    assert not rep.has_errors
    # the .json array keeps the line each record starts on
    assert [r.where for r in rep.records if r.path == str(d)] == [f"{d}:2", f"{d}:6"]


def test_sharegpt_turn_problems(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]},
        {"conversations": []},
    ]
    f = write_jsonl(tmp_path / "s.jsonl", rows)
    rep = audit([f])
    by = {x.code: x for x in rep.findings}
    assert f"{f}:1" in by["empty_completion"].examples
    assert f"{f}:2" in by["unconvertible_record"].examples  # unknown speaker: the loader's own message
    assert "unknown speaker" in by["unconvertible_record"].message
    assert f"{f}:3" in by["non_string_field"].examples


def test_missing_file_is_a_usage_error(tmp_path):
    import pytest

    from tunelab.data.formats import DataError

    with pytest.raises(DataError, match="file not found"):
        audit([tmp_path / "nope.jsonl"])


def test_csv_parquet_and_empty_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "d.csv"
    csv.write_text("instruction,input,output\nSay hi,,Hi\nSay bye,,\n")
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}]), pqf)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    rep = audit([csv, pqf, empty])
    assert [fi.format for fi in rep.files] == ["alpaca", "flan", None]
    by = {x.code: x for x in rep.findings}
    assert by["empty_completion"].examples == [f"{csv}:3"]  # CSV lines count the header
    assert by["empty_file"].examples == [f"{empty}:1"] and by["empty_file"].severity == "error"
    assert rep.files[1].converted == 2
