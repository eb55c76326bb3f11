"""Exact duplicates after normalization, conflicting completions, exact train/eval leakage."""

from __future__ import annotations

from audit_helpers import alpaca, audit, write_jsonl

from tunelab.audit.normalize import normalize


def test_normalization_ignores_case_whitespace_and_punctuation():
    assert normalize("Hello,  World!\n") == normalize("hello world") == "hello world"
    assert normalize("Ｈｅｌｌｏ") == "hello"  # NFKC: full-width letters
    assert normalize("don't") == "don t"


def test_planted_exact_duplicates(tmp_path):
    rows = [
        alpaca("What is the capital of France?", "Paris is the capital of France."),     # 1
        alpaca("Name a primary color.", "Red."),                                        # 2
        alpaca("what is the capital of france", "Paris, is the capital of France!!"),   # 3 = 1 after normalization
        alpaca("Name a  primary color", "red"),                                         # 4 = 2
        alpaca("Name a primary color.", "Red."),                                        # 5 = 2 (verbatim)
        alpaca("Something else entirely?", "Yes."),                                     # 6
    ]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    rep = audit([f])
    (dup,) = rep.finding("exact_duplicate")
    assert dup.count == 3 and dup.severity == "warning"
    assert set(dup.examples) == {f"{f}:3", f"{f}:4", f"{f}:5"}
    groups = rep.sections["duplicates"]["groups"]
    assert sorted(g["size"] for g in groups) == [2, 3]
    assert {tuple(g["records"]) for g in groups} == {(f"{f}:1", f"{f}:3"), (f"{f}:2", f"{f}:4", f"{f}:5")}
    assert rep.exit_code == 0  # duplicates warn, they do not fail CI


def test_conflicting_completions(tmp_path):
    rows = [
        {"prompt": "Review: great film. Sentiment?", "completion": "positive"},
        {"prompt": "Review: great film. Sentiment?", "completion": "negative"},
        {"prompt": "Review: dull film. Sentiment?", "completion": "negative"},
        {"prompt": "Review: dull film! Sentiment", "completion": "Negative."},  # same after normalization: no conflict
    ]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    rep = audit([f])
    (c,) = rep.finding("conflicting_completions")
    assert c.count == 2 and set(c.examples) == {f"{f}:1", f"{f}:2"}
    conflict = rep.sections["duplicates"]["conflicts"][0]
    assert {x["text"] for x in conflict["completions"]} == {"positive", "negative"}


def test_exact_leakage_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [alpaca("Translate 'cat' to French.", "chat"), alpaca("2+2?", "4")])
    ev = write_jsonl(tmp_path / "eval.jsonl", [
        alpaca("Translate 'cat' to French", "Chat."),   # 1 the same record
        alpaca("2+2?", "four"),                          # 2 the same prompt
        alpaca("3+3?", "6"),                             # 3 clean
    ])
    rep = audit([train], [ev])
    (leak,) = rep.finding("train_eval_leakage")
    assert leak.severity == "error" and leak.count == 2
    assert set(leak.examples) == {f"{ev}:1", f"{ev}:2"}
    kinds = {p["eval"]: p["kind"] for p in rep.sections["leakage"]["pairs"]}
    assert kinds == {f"{ev}:1": "exact", f"{ev}:2": "same prompt"}
    assert rep.exit_code == 1
    # duplicates across the split are leakage, not train duplicates
    assert not rep.finding("exact_duplicate")
