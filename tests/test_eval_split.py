"""The default eval split (5%, min 16, max 500, none under 40 records) and the replay buffer."""

from __future__ import annotations

from collections import Counter

import pytest

from tinymodels import write_jsonl
from tunelab.config import ConfigError, config_from_dict
from tunelab.data.pipeline import prepare_conversations, prepare_data
from tunelab.data.render import Renderer
from tunelab.data.replay import REPLAY_TASK, replay_share


def _rows(n: int, task: str = "a") -> list[dict]:
    return [{"instruction": f"Question {task} number {i}?", "output": f"Answer {i}.", "task": task} for i in range(n)]


def _cfg(tmp_path, files: list, **data) -> object:
    return config_from_dict({"data": {"train": [{"path": str(f)} for f in files], "audit": "off", **data}, "template": "chatml"})


@pytest.mark.parametrize("n,expected", [(39, 0), (40, 16), (320, 16), (400, 20), (2000, 100), (20000, 500)])
def test_default_split_has_the_stated_size_and_no_overlap(tmp_path, n, expected):
    f = write_jsonl(tmp_path / "d.jsonl", _rows(n // 2, "a") + _rows(n - n // 2, "b"))
    train, ev, _, _ = prepare_conversations(_cfg(tmp_path, [f]))
    assert len(ev) == expected and len(train) + len(ev) == n
    assert not {c.source for c in train} & {c.source for c in ev}  # no record on both sides
    if expected:
        counts = Counter(c.task for c in ev)
        assert abs(counts["a"] - counts["b"]) <= 1  # stratified by task
    again, ev2, _, _ = prepare_conversations(_cfg(tmp_path, [f]))
    assert [c.source for c in ev2] == [c.source for c in ev]  # seeded


def test_the_split_is_said_in_one_line(tmp_path, tokenizer):
    r = Renderer(tokenizer, "chatml")
    big = write_jsonl(tmp_path / "big.jsonl", _rows(400))
    d = prepare_data(_cfg(tmp_path, [big]), r)
    assert len(d.eval) == 20 and "\n" not in d.eval_note
    assert d.eval_note.startswith("eval: no data.eval, so 20 of 400 training records are held out (5%, at least 16, at most 500")
    assert "data.eval_fraction: 0 turns this off" in d.eval_note
    off = prepare_data(_cfg(tmp_path, [big], eval_fraction=0), r)
    assert not off.eval and "early stopping is off" in off.eval_note
    small = write_jsonl(tmp_path / "small.jsonl", _rows(12))
    s = prepare_data(_cfg(tmp_path, [small]), r)
    assert not s.eval and len(s.train) == 12
    assert "12 training records are fewer than 40" in s.eval_note and "early stopping is off" in s.eval_note


def _replay_file(tmp_path):
    words = "the quick brown fox jumps over the lazy dog while it rains on the plain".split()
    return write_jsonl(tmp_path / "general.jsonl", [{"text": " ".join(words[i % 7:] + words[: i % 7]) * (1 + i % 3)} for i in range(40)])


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_replay_share_of_trained_tokens_is_within_one_point(tmp_path, tokenizer, fraction):
    f = write_jsonl(tmp_path / "d.jsonl", _rows(200))
    cfg = _cfg(tmp_path, [f], replay={"path": str(_replay_file(tmp_path)), "fraction": fraction})
    d = prepare_data(cfg, Renderer(tokenizer, "chatml"))
    rep = [e for e in d.train if e.task == REPLAY_TASK]
    assert rep and d.replay.records == len(rep)
    assert all(e.n_trained == len(e) for e in rep)  # LM loss on every token of a replay record
    replayed, total = replay_share(d.train, [list(range(len(d.train)))])
    assert abs(replayed / total - fraction) <= 0.01 and abs(d.replay.achieved - fraction) <= 0.01
    assert not any(e.task == REPLAY_TASK for e in d.eval)  # replay never lands in the eval set


def test_replay_fraction_defaults_and_is_validated(tmp_path):
    assert config_from_dict({"data": {"replay": {"path": "g.jsonl"}}}).data.replay.fraction == 0.05
    with pytest.raises(ConfigError, match="fraction"):
        config_from_dict({"data": {"replay": {"path": "g.jsonl", "fraction": 0.9}}})


def test_a_run_reports_the_replay_share_it_achieved_and_preview_shows_it(tmp_path, tiny_model_dir):
    import io
    import subprocess
    import sys

    from rich.console import Console

    from tunelab.train.recipe import train

    f = write_jsonl(tmp_path / "d.jsonl", _rows(200))
    replay = _replay_file(tmp_path)
    cfg_d = {"name": "rp", "output_dir": str(tmp_path / "run"), "template": "chatml", "model": {"name": tiny_model_dir, "dtype": "fp32"},
             "data": {"train": [{"path": str(f)}], "replay": {"path": str(replay), "fraction": 0.1}, "audit": "warn"},
             "lora": {"rank": 4}, "train": {"epochs": 1, "batch_size": 8, "seed": 0, "early_stopping": {"enabled": False}, "eval_every": 1000}}
    buf = io.StringIO()
    res = train(config_from_dict(cfg_d), console=Console(file=buf, width=200))
    out = buf.getvalue()
    assert abs(res.replay_share - 0.1) <= 0.01
    assert f"replay: {100 * res.replay_share:.1f}% of the" in out and "(asked 10.0%)" in out
    assert "replay general.jsonl:" in out  # in the audit summary
    assert "eval: no data.eval, so 16 of 200 training records are held out" in out

    import yaml
    cfg_path = tmp_path / "rp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_d))
    p = subprocess.run([sys.executable, "-m", "tunelab", "preview", str(cfg_path), "-n", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "replay general.jsonl:" in p.stdout and "quick brown fox" in p.stdout


def test_eval_losses_show_on_a_terminal_as_they_happen(tmp_path):
    import io

    from rich.console import Console

    from tunelab.train.reporting import Reporter

    buf = io.StringIO()
    rep = Reporter(tmp_path, Console(file=buf, force_terminal=True, width=160))
    rep.start(10)
    rep.metrics(event="train", step=1, train_loss=2.5, lr=1e-4, tokens_per_s=10.0)
    rep.metrics(event="eval", step=1, eval_loss=1.23456)
    rep.close()
    out = buf.getvalue()
    assert "step 1/10  eval_loss 1.2346" in out and "eval 1.2346" in out  # the line above the bar, and the bar's field
    assert "train_loss" not in out  # train steps live in the bar only
