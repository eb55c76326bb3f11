"""The audit as tunelab train runs it: data.audit off | warn | strict, one-screen summary."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from audit_helpers import alpaca, write_jsonl
from rich.console import Console

from tunelab.audit import AuditFailed, audit_for_training
from tunelab.config import config_from_dict
from tunelab.data.formats import DataError, Record, to_conversation


class Rep:
    def __init__(self):
        self.infos, self.warns = [], []

    def info(self, msg):
        self.infos.append(msg)

    def warn(self, msg):
        self.warns.append(msg)


def cfg_for(tmp_path, rows, mode, **data):
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    return config_from_dict({"template": "chatml", "output_dir": str(tmp_path / "run"),
                             "data": {"train": [{"path": str(f)}], "audit": mode, "max_seq_len": 64, **data}}), f


GOOD = [alpaca(f"Question {k}?", f"Answer {k}.") for k in range(4)]
BAD = GOOD + [alpaca("Stop?", "<|endoftext|>")]


def test_off_returns_none(tmp_path, chatml):
    cfg, _ = cfg_for(tmp_path, BAD, "off")
    assert audit_for_training(cfg, chatml) is None


def test_warn_prints_summary_and_continues(tmp_path, chatml):
    cfg, f = cfg_for(tmp_path, BAD, "warn")
    rep = Rep()
    report = audit_for_training(cfg, chatml, None, rep)
    assert report.has_errors and "special_token_in_text" in report.codes("error")
    assert len(rep.infos) == 1 and rep.warns and "strict" in rep.warns[0]
    console = Console(record=True, width=120)
    console.print(rep.infos[0])
    screen = console.export_text()
    assert "FAIL" in screen and "special_token_in_text" in screen and len(screen.splitlines()) < 40
    text = report.summary_text()
    assert text.splitlines()[0].startswith("data audit: 5 records") and len(text.splitlines()) <= 20
    assert not (cfg.run_dir / "audit-spotcheck.html").exists()  # fast mode: no spot-check file


def test_strict_refuses_errors_and_accepts_clean_data(tmp_path, chatml):
    cfg, _ = cfg_for(tmp_path, BAD, "strict")
    with pytest.raises(AuditFailed) as e:
        audit_for_training(cfg, chatml)
    assert isinstance(e.value, DataError) and "special_token_in_text" in str(e.value)
    cfg, _ = cfg_for(tmp_path, GOOD, "strict")
    assert audit_for_training(cfg, chatml).exit_code == 0


def test_eval_fraction_split_is_checked_for_leakage(tmp_path, chatml):
    rows = GOOD + [GOOD[1]]  # line 5 repeats line 2
    cfg, f = cfg_for(tmp_path, rows, "warn", eval_fraction=0.2)
    # training held out line 2 for eval (what PreparedData.eval_conversations says)
    held = to_conversation(Record(rows[1], str(f), 2), "alpaca", "train")
    report = audit_for_training(cfg, chatml, SimpleNamespace(eval_conversations=[held]))
    assert report.summary["eval_records"] == 1
    (leak,) = report.finding("train_eval_leakage")
    assert leak.examples == [f"{f}:2"]
