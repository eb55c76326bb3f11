"""Readers, format detection and conversion; bad input errors name file:line."""

from __future__ import annotations

import json

import pytest

from tinymodels import write_jsonl
from tunelab.data.formats import DataError, load_dataset_file, read_records


def test_each_format_detected_and_converted(tmp_path):
    cases = {
        "alpaca": ({"instruction": "Do X", "input": "ctx", "output": "done"}, [("user", "Do X\n\nctx"), ("assistant", "done")]),
        "dolly": ({"instruction": "Q", "context": "C", "response": "R", "category": "qa"}, [("user", "Q\n\nC"), ("assistant", "R")]),
        "flan": ({"inputs": "I", "targets": "T"}, [("user", "I"), ("assistant", "T")]),
        "sharegpt": ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "H"}, {"from": "gpt", "value": "G"}]},
                     [("system", "S"), ("user", "H"), ("assistant", "G")]),
        "messages": ({"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}, [("user", "U"), ("assistant", "A")]),
    }
    for fmt, (rec, want) in cases.items():
        p = write_jsonl(tmp_path / f"{fmt}.jsonl", [rec])
        ds = load_dataset_file(p)
        assert ds.format == fmt
        assert [(m["role"], m["content"]) for m in ds.conversations[0].messages] == want
    assert load_dataset_file(tmp_path / "dolly.jsonl").conversations[0].task == "qa"
    p = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "P", "completion": "C"}])
    assert load_dataset_file(p).format == "flan"
    p = write_jsonl(tmp_path / "text.jsonl", [{"text": "raw"}])
    ds = load_dataset_file(p)
    assert ds.format == "text" and ds.conversations[0].text == "raw"


def test_format_override_beats_detection(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "P", "completion": "C", "text": "ignored"}])
    assert load_dataset_file(p, "flan").conversations[0].messages[1]["content"] == "C"
    with pytest.raises(DataError, match="does not match format 'alpaca'"):
        load_dataset_file(p, "alpaca")


def test_json_csv_parquet_readers_keep_lines(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    recs = list(read_records(tmp_path / "a.json"))
    assert [r.data["output"] for r in recs] == ["o0", "o1", "o2"]
    text_lines = (tmp_path / "a.json").read_text().splitlines()
    for r in recs:  # each record's line is where its object starts
        assert text_lines[r.line - 1].strip() == "{"
    (tmp_path / "a.csv").write_text('instruction,input,output\ni0,,o0\n"multi\nline",,o1\n')
    recs = list(read_records(tmp_path / "a.csv"))
    assert [r.line for r in recs] == [2, 3] and recs[1].data["instruction"] == "multi\nline"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    ds = load_dataset_file(tmp_path / "a.parquet")
    assert ds.format == "alpaca" and len(ds.conversations) == 3 and ds.conversations[2].source.endswith(":3")


def test_malformed_jsonl_line_is_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError) as e:
        load_dataset_file(p)
    assert f"{p}:2" in str(e.value) and "invalid JSON" in str(e.value)


def test_unknown_format_lists_keys_and_supported_formats(tmp_path):
    p = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        load_dataset_file(p)
    msg = str(e.value)
    assert f"{p}:1" in msg and "['answer', 'question']" in msg
    for fmt in ("alpaca", "dolly", "flan", "sharegpt", "messages", "text"):
        assert fmt in msg


def test_bad_records_raise_or_skip(tmp_path):
    rows = [{"instruction": "ok", "output": "yes"}, {"instruction": "empty", "output": "  "}, {"instruction": ["x"], "output": "y"}]
    p = write_jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(DataError, match=rf"{p}:2: empty assistant completion"):
        load_dataset_file(p)
    ds = load_dataset_file(p, on_error="skip")
    assert len(ds.conversations) == 1 and len(ds.skipped) == 2
    assert ds.skipped[0].startswith(f"{p}:2") and ds.skipped[1].startswith(f"{p}:3")


def test_sharegpt_roles_and_tools(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{\"name\": \"w\"}"},
                             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}],
           "tools": "[{\"name\": \"w\"}]"}
    conv = load_dataset_file(write_jsonl(tmp_path / "s.jsonl", [rec])).conversations[0]
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert "following tools" in conv.messages[0]["content"]
    bad = {"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}
    with pytest.raises(DataError, match="unknown speaker 'alien'"):
        load_dataset_file(write_jsonl(tmp_path / "s2.jsonl", [bad]))


# ----------------------------------------------------------------- real data (../shared/data)

def test_real_alpaca(shared_data):
    ds = load_dataset_file(shared_data / "alpaca_en_demo.json")
    assert ds.format == "alpaca" and len(ds.conversations) == 999
    assert ds.conversations[0].messages[-1]["role"] == "assistant"


def test_real_glaive_toolcall_is_sharegpt_with_tools(shared_data):
    ds = load_dataset_file(shared_data / "glaive_toolcall_en_demo.json")
    assert ds.format == "sharegpt" and len(ds.conversations) == 300
    roles = {m["role"] for c in ds.conversations for m in c.messages}
    assert roles == {"system", "user", "assistant", "tool"}
    assert sum("following tools" in c.messages[0]["content"] for c in ds.conversations) > 250


def test_real_t0_prompt_completion(shared_data):
    files = sorted((shared_data / "t0").glob("*.jsonl"))
    assert files
    for f in files:
        ds = load_dataset_file(f)
        assert ds.format == "flan", f
        assert ds.conversations[0].task == f.stem
        assert all(len(c.messages) == 2 for c in ds.conversations)
