"""The CLI: preview --json, clear errors and exit codes."""

from __future__ import annotations

import json

from tinymodels import write_jsonl
from tunelab.cli import main


def _config(tmp_path, model_dir, extra=""):
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {k}", "input": "", "output": f"{k}!"} for k in range(4)])
    p = tmp_path / "run.yaml"
    p.write_text(f"model:\n  name: {model_dir}\ntemplate: chatml\ndata:\n  train:\n    - path: d.jsonl\n{extra}")
    return p


def test_preview_json(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir)
    assert main(["preview", str(cfg), "-n", "2", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 2
    for row in lines:
        assert set(row) == {"segments", "n_tokens", "n_trained", "n_tokens_full", "status", "source"} and row["status"] == "kept"
        trained = [s["text"] for s in row["segments"] if s["trained"]]
        assert len(trained) == 1 and trained[0].endswith("!<|im_end|>")
        assert row["n_trained"] < row["n_tokens"]


def test_config_errors_exit_2_with_message(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "  max_seq_lenn: 8\n")
    assert main(["preview", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'data.max_seq_lenn'" in err and "did you mean 'data.max_seq_len'" in err


def test_bad_data_exit_2_names_line(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir)
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    assert main(["preview", str(cfg)]) == 2
    assert "d.jsonl:2: invalid JSON" in capsys.readouterr().err


def test_config_doc_lists_fields(capsys):
    assert main(["config-doc"]) == 0
    out = capsys.readouterr().out
    assert "train.early_stopping.patience" in out and "lora.targets" in out
