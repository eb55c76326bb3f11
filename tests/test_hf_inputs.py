"""Hugging Face datasets inputs (save_to_disk folders, hub ids from the local cache) and column
mapping, for files and datasets alike. No network: hub datasets are written into a temporary
HF_HOME cache by the test, as a download would leave them."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinymodels import write_jsonl
from tunelab.cli import main
from tunelab.config import ConfigError, config_from_dict, load_config
from tunelab.data.formats import DataError
from tunelab.data.pipeline import load_conversations, prepare_conversations

datasets = pytest.importorskip("datasets")

QA = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "topic": "math"} for i in range(6)]


def entry(**kw):
    return config_from_dict({"data": {"train": [kw]}}).data.train[0]


def cache_hub_dataset(hf_home: Path, repo_id: str, rows: list[dict], tmp: Path) -> None:
    """Put ``rows`` into ``hf_home``'s datasets cache under ``repo_id`` as the hub loader leaves
    them (<ns>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow + dataset_info.json)."""
    from datasets.packaged_modules.json.json import Json

    src = write_jsonl(tmp / "hub-src.jsonl", rows)
    name = repo_id.split("/")[-1]
    build = tmp / "build"
    Json(dataset_name=name, config_name="default", hash="0123abcd", data_files={"train": str(src)}, cache_dir=str(build)).download_and_prepare()
    (config_dir,) = glob.glob(str(build / name / "*"))
    dst = hf_home / "datasets" / repo_id.replace("/", "___") / "default"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(config_dir, dst)


# --------------------------------------------------------------------------- save_to_disk

def test_save_to_disk_dict_with_split_and_mapping(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(QA), "test": datasets.Dataset.from_list(QA[:2])})
    dd.save_to_disk(str(tmp_path / "qa"))
    convs, fmt, _ = load_conversations(entry(path=str(tmp_path / "qa"), columns={"prompt": "question", "completion": "answer"}), "raise")
    assert fmt == "flan" and len(convs) == 6  # train is the default split of a dict
    assert convs[2].messages == [{"role": "user", "content": "What is 2 + 1?"}, {"role": "assistant", "content": "3"}]
    assert convs[2].source == f"{tmp_path / 'qa'}[train] row 2" and convs[0].task == "qa"
    convs, _, _ = load_conversations(entry(path=str(tmp_path / "qa"), split="test", columns={"prompt": "question", "completion": "answer"}), "raise")
    assert len(convs) == 2
    with pytest.raises(DataError, match=r"no split 'validation'; the dataset has \['train', 'test'\]"):
        load_conversations(entry(path=str(tmp_path / "qa"), split="validation"), "raise")


def test_save_to_disk_errors_name_dataset_and_row(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e", "output": "  "}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError) as e:
        load_conversations(entry(path=str(tmp_path / "one")), "raise")
    assert str(e.value).startswith(f"{tmp_path / 'one'} row 2: empty assistant completion")
    convs, fmt, skipped = load_conversations(entry(path=str(tmp_path / "one")), "skip")
    assert fmt == "alpaca" and len(convs) == 2 and skipped[0].startswith(f"{tmp_path / 'one'} row 2:")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_conversations(entry(path=str(tmp_path / "plain")), "raise")


# --------------------------------------------------------------------------- hub cache

def test_hub_dataset_from_the_local_cache_offline(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    cache_hub_dataset(home, "tunelab-test/tiny-qa", QA, tmp_path)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    convs, fmt, _ = load_conversations(entry(hub="tunelab-test/tiny-qa", split="train", columns={"prompt": "question", "completion": "answer"}), "raise")
    assert fmt == "flan" and [c.messages[1]["content"] for c in convs] == [r["answer"] for r in QA]
    assert convs[0].source == "hub:tunelab-test/tiny-qa[train] row 0" and convs[0].task == "tiny-qa"
    with pytest.raises(DataError, match=r"hub:tunelab-test/tiny-qa: no split 'validation'; the dataset has \['train'\]"):
        load_conversations(entry(hub="tunelab-test/tiny-qa", split="validation"), "raise")
    with pytest.raises(DataError) as e:  # not cached: one clear line, no traceback, no network wait
        load_conversations(entry(hub="tunelab-test/not-cached", split="train"), "raise")
    msg = str(e.value)
    assert msg.startswith("hub:tunelab-test/not-cached: not in the local Hugging Face cache") and str(home) in msg and "save_to_disk" in msg


def test_hub_dataset_without_mapping_suggests_one(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    cache_hub_dataset(home, "tunelab-test/tiny-qa", QA, tmp_path)
    monkeypatch.setenv("HF_HOME", str(home))
    with pytest.raises(DataError) as e:
        load_conversations(entry(hub="tunelab-test/tiny-qa"), "raise")
    assert str(e.value).startswith("hub:tunelab-test/tiny-qa[train] row 0: unknown record format")
    assert "`columns: {prompt: question, completion: answer}`" in str(e.value)


def test_entry_needs_path_or_hub():
    with pytest.raises(ConfigError, match="needs a path .* or a hub id, not both"):
        entry(path="a.jsonl", hub="x/y")
    with pytest.raises(ConfigError, match="expected a mapping"):
        entry(path="a.jsonl", columns="question")


# --------------------------------------------------------------------------- column mapping on files

@pytest.mark.parametrize("rows,columns,fmt,want", [
    ([{"q": "Hi?", "a": "Hello."}], {"prompt": "q", "completion": "a"}, "flan", [("user", "Hi?"), ("assistant", "Hello.")]),
    ([{"dialog": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}], {"messages": "dialog"}, "messages",
     [("user", "Hi?"), ("assistant", "Hello.")]),
    ([{"q": "Summarise.", "ctx": "A long text.", "a": "Short."}], {"instruction": "q", "input": "ctx", "output": "a"}, "alpaca",
     [("user", "Summarise.\n\nA long text."), ("assistant", "Short.")]),
])
def test_column_mapping_on_a_file(tmp_path, rows, columns, fmt, want):
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    convs, got_fmt, _ = load_conversations(entry(path=str(f), columns=columns), "raise")
    assert got_fmt == fmt and [(m["role"], m["content"]) for m in convs[0].messages] == want


@pytest.mark.parametrize("row,hint", [
    ({"question": "x", "answer": "y"}, "columns: {prompt: question, completion: answer}"),
    ({"query": "x", "context": "c", "response_text": "y", "reply": "z"}, "columns: {instruction: query, input: context, output: reply}"),
    ({"dialog": [{"role": "user", "content": "x"}]}, "columns: {messages: dialog}"),
    ({"chat": [{"from": "human", "value": "x"}]}, "columns: {conversations: chat}"),
    ({"src": "x", "tgt": "y"}, "columns: {prompt: src, completion: tgt}"),
])
def test_unknown_keys_get_a_mapping_suggestion(tmp_path, row, hint):
    f = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_conversations(entry(path=str(f)), "raise")
    assert f"d.jsonl:1: unknown record format" in str(e.value) and hint in str(e.value)


def test_mapping_to_a_missing_column_names_the_record(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}, {"q": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: columns maps 'completion' to column 'a', which the record lacks"):
        load_conversations(entry(path=str(f), columns={"prompt": "q", "completion": "a"}), "raise")


# --------------------------------------------------------------------------- from the CLI

def test_cli_preview_of_a_cached_hub_dataset(tmp_path, tiny_model_dir, monkeypatch, capsys):
    home = tmp_path / "hf"
    cache_hub_dataset(home, "tunelab-test/tiny-qa", QA, tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_dir}\ntemplate: chatml\ndata:\n  train:\n"
                   "    - hub: tunelab-test/tiny-qa\n      split: train\n      columns: {prompt: question, completion: answer}\n")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "tunelab", "preview", str(cfg), "-n", "2", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(rows) == 2 and [s["text"] for s in rows[1]["segments"] if s["trained"]] == ["2<|im_end|>"]
    cfg.write_text(cfg.read_text().replace("tiny-qa", "missing"))
    monkeypatch.setenv("HF_HOME", str(home))
    assert main(["preview", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("tunelab: error: hub:tunelab-test/missing: not in the local Hugging Face cache")


def test_config_doc_documents_the_new_fields(capsys):
    assert main(["config-doc"]) == 0
    r = capsys.readouterr()
    rows = {line.split()[0]: line for line in r.out.splitlines() if line.strip()}
    assert "local HF cache" in rows["data.eval.hub"] and "save_to_disk" in rows["data.eval.split"]
    assert "{prompt: question, completion: answer}" in rows["data.eval.columns"] and "hub, split, columns" in rows["data.train"]
    assert ".jinja file" in rows["template"] and "parity" in rows["template"]
    assert "tensorboard" in rows["report_to"] and "mlflow" in rows["report_to"] and "wandb" in rows["report_to"]


def test_training_on_a_saved_dataset_with_mapping(tmp_path, tiny_model_dir):
    import io

    from rich.console import Console

    from tunelab.train.recipe import train

    datasets.Dataset.from_list(QA).save_to_disk(str(tmp_path / "qa"))
    cfg = config_from_dict({
        "name": "hf", "output_dir": str(tmp_path / "run"), "template": "chatml",
        "model": {"name": tiny_model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(tmp_path / "qa"), "columns": {"prompt": "question", "completion": "answer"}}]},
        "train": {"max_steps": 2, "batch_size": 3},
    })
    out = io.StringIO()
    result = train(cfg, console=Console(file=out, width=300))
    log = out.getvalue()
    assert result.steps == 2 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert "from qa (flan)" in log  # the header's data line names the dataset and its format
    assert "data audit skips" in log and "not audited yet" in log
