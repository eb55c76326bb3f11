"""tunelab audit on the command line: exit codes, --json (schema of docs/audit.md), --config."""

from __future__ import annotations

from pathlib import Path

import json

import yaml
from audit_helpers import alpaca, cli_args, write_jsonl

from tunelab.audit import SCHEMA_VERSION
from tunelab.audit.cli import run_audit_command

TOP_KEYS = {"schema_version", "tool", "summary", "settings", "tokenizer", "files", "findings", "schema", "duplicates",
            "near_duplicates", "leakage", "balance", "lengths", "artifacts", "spot_check", "timings"}
FINDING_KEYS = {"code", "severity", "message", "count", "examples", "fix", "section"}


def test_clean_data_exits_0_and_writes_json(tmp_path, capsys):
    f = write_jsonl(tmp_path / "ok.jsonl", [alpaca(f"Question {k}?", f"Answer number {k}.") for k in range(5)])
    out = tmp_path / "report.json"
    assert run_audit_command(cli_args(str(f), "--no-tokenizer", "--sample", "0", "--json", str(out))) == 0
    rep = json.loads(out.read_text())
    assert set(rep) == TOP_KEYS
    assert rep["schema_version"] == SCHEMA_VERSION and rep["summary"]["passed"] and rep["summary"]["exit_code"] == 0
    assert rep["summary"]["records"] == 5 and rep["files"][0]["format"] == "alpaca"
    assert "PASS" in capsys.readouterr().out


def test_errors_exit_1_and_json_to_stdout(tmp_path, capsys):
    f = write_jsonl(tmp_path / "bad.jsonl", [alpaca("Q?", "A<|endoftext|>"), alpaca("Q2?", "")])
    code = run_audit_command(cli_args(str(f), "--no-tokenizer", "--sample", "0", "--json", "-"))
    assert code == 1
    rep = json.loads(capsys.readouterr().out)  # stdout holds the JSON document only
    assert set(rep) == TOP_KEYS
    assert rep["summary"]["errors"] >= 2 and not rep["summary"]["passed"]
    for fnd in rep["findings"]:
        assert set(fnd) == FINDING_KEYS and fnd["severity"] in ("error", "warning", "info")
        assert all(isinstance(x, str) and ":" in x for x in fnd["examples"])
    assert rep["findings"][0]["severity"] == "error"  # errors first


def test_config_supplies_data_tokenizer_template_and_max_seq_len(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", [  # the config names it as train.jsonl
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ".join(["ok"] * 8)}]},
        {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "ok"}]},
    ])
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ".join(["ok"] * 8)}]}])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"template": "chatml", "data": {"train": ["train.jsonl"], "eval": "eval.jsonl", "max_seq_len": 16}}))
    out = tmp_path / "r.json"
    code = run_audit_command(cli_args("--config", str(cfg), "--sample", "0", "--json", str(out)))
    rep = json.loads(out.read_text())
    assert code == 1  # the eval record is in train: leakage
    assert rep["tokenizer"]["unit"] == "tokens" and rep["tokenizer"]["template"] == "chatml"
    assert rep["lengths"]["max_seq_len"] == 16 and rep["lengths"]["over_max_seq_len"] == 2  # 20 tokens, as hand-counted
    assert [f["split"] for f in rep["files"]] == ["train", "eval"]
    assert rep["leakage"]["eval_records_leaked"] == 1
    # DATA on the command line replaces the config's train files; --set overrides like tunelab train
    code = run_audit_command(cli_args(str(ev), "--config", str(cfg), "--set", "data.max_seq_len=32", "--sample", "0", "--json", str(out)))
    rep = json.loads(out.read_text())
    assert rep["lengths"]["max_seq_len"] == 32 and rep["summary"]["train_records"] == 1


def test_usage_errors_exit_2(tmp_path, capsys):
    assert run_audit_command(cli_args("--no-tokenizer")) == 2
    assert run_audit_command(cli_args(str(tmp_path / "missing.jsonl"), "--no-tokenizer")) == 2
    f = write_jsonl(tmp_path / "ok.jsonl", [alpaca("Q?", "A.")])
    assert run_audit_command(cli_args(str(f), "--balance", "cap")) == 2
    assert run_audit_command(cli_args(str(f), "--near-dup-threshold", "1.5")) == 2
    assert "error" in capsys.readouterr().err


def test_spot_check_file_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    f = write_jsonl(tmp_path / "ok.jsonl", [alpaca(f"Question {k}?", f"Answer {k}.") for k in range(3)])
    assert run_audit_command(cli_args(str(f), "--no-tokenizer", "--quiet")) == 0
    sc = tmp_path / "runs" / "audit-ok" / "audit-spotcheck.html"  # never the working directory itself
    assert sc.exists() and not (tmp_path / "audit-spotcheck.html").exists()
    out = capsys.readouterr()
    assert "spot check" not in out.err and str(Path("runs") / "audit-ok" / "audit-spotcheck.html") in out.out
