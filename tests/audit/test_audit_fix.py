"""--fix: a cleaned JSONL copy; inputs untouched; what was removed and why."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
from audit_helpers import VOCAB, alpaca, audit, cli_args, write_jsonl

from tunelab.audit import write_fixed
from tunelab.audit.cli import run_audit_command


def digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def dirty(tmp_path):
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choices(VOCAB, k=n))  # noqa: E731
    base = [alpaca(text(8), text(80)) for _ in range(6)]
    near = dict(base[2], output=base[2]["output"] + " indeed")
    rows = base + [
        dict(base[0], output=base[0]["output"].upper()),  # 7: exact duplicate of 1 (case)
        near,                                              # 8: near-duplicate of 3
        alpaca("Nothing to say.", "   "),                  # 9: empty completion
        alpaca("Stop.", "<|endoftext|>"),                  # 10: artifact-only
        '{"instruction": "broken"',                         # 11: invalid JSON
        base[4],                                            # 12: exact duplicate of 5
    ]
    return write_jsonl(tmp_path / "train.jsonl", rows), rows


def test_fix_writes_clean_copy_and_leaves_input_alone(tmp_path, chatml):
    src, rows = dirty(tmp_path)
    before = digest(src)
    rep = audit([src], renderer=chatml)
    out = tmp_path / "out" / "clean.jsonl"
    res = write_fixed(rep, out)
    assert digest(src) == before
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == rows[:6]  # the six originals, in order, exactly as they were
    assert res.read == 11 and res.written == 6  # 12 lines, one of them not JSON
    assert dict(res.removed) == {
        "exact duplicate": 2, "near-duplicate": 1, "cannot be trained (empty_completion)": 1,
        "completion is only special tokens or markers": 1, "line is not valid JSON": 1,
    }
    text = "\n".join(res.lines())
    assert f"{src}:7 (of {src}:1)" in text and f"{src}:8 (of {src}:3)" in text and f"{src}:11" in text
    assert not [p for p in out.parent.iterdir() if p.name != "clean.jsonl"]  # no temp files left behind


def test_fix_refuses_to_overwrite_an_input(tmp_path):
    src, _ = dirty(tmp_path)
    before = digest(src)
    rep = audit([src])
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_fixed(rep, src)
    link = tmp_path / "link.jsonl"
    os.symlink(src, link)
    with pytest.raises(FileExistsError):
        write_fixed(rep, link)
    assert digest(src) == before


def test_fix_folder_output_per_input(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [alpaca("x?", "y"), alpaca("x?", "y")])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    rep = audit([a, b])
    res = write_fixed(rep, tmp_path / "clean")
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["a.jsonl", "b.jsonl"]
    assert len((tmp_path / "clean" / "a.jsonl").read_text().splitlines()) == 1
    assert res.written == 2


def test_fix_balance_cap_and_upsample(tmp_path):
    rows = [{"prompt": f"review {k}: good?", "completion": "yes" if k < 240 else "no"} for k in range(300)]
    f = write_jsonl(tmp_path / "l.jsonl", rows)
    rep = audit([f], near_dups=False)
    capped = write_fixed(rep, tmp_path / "cap.jsonl", balance="cap", seed=1)
    labels = [json.loads(x)["completion"] for x in (tmp_path / "cap.jsonl").read_text().splitlines()]
    assert labels.count("yes") == labels.count("no") == 60 and capped.removed
    up = write_fixed(rep, tmp_path / "up.jsonl", balance="upsample", seed=1)
    labels = [json.loads(x)["completion"] for x in (tmp_path / "up.jsonl").read_text().splitlines()]
    assert labels.count("yes") == labels.count("no") == 240 and up.added == 180


def test_cli_fix_prints_removals(tmp_path, capsys):
    src, _ = dirty(tmp_path)
    out = tmp_path / "clean.jsonl"
    code = run_audit_command(cli_args(str(src), "--no-tokenizer", "--sample", "0", "--fix", str(out)))
    assert code == 1  # the input has errors; the copy is written anyway
    printed = capsys.readouterr().out
    assert "--fix: wrote 6 of 11 train records" in printed and "removed" in printed
    assert out.exists()
    assert run_audit_command(cli_args(str(out), "--no-tokenizer", "--sample", "0")) == 0  # the copy passes
    assert run_audit_command(cli_args(str(src), "--no-tokenizer", "--sample", "0", "--fix", str(src))) == 2
