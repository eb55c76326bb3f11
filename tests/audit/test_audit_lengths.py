"""Lengths in tokens of the rendered template, and what max_seq_len cuts (right truncation)."""

from __future__ import annotations

import random

import pytest
from audit_helpers import VOCAB, audit, write_jsonl

from tunelab.audit.findings import Tally
from tunelab.audit.reader import read_file
from tunelab.audit.schema import check_and_convert
from tunelab.audit.tokens import _from_labels, count_tokens


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_truncation_counts_match_a_hand_computed_case(tmp_path, chatml):
    # ChatML with SmolLM2's tokenizer, counted by hand:
    #   <|im_start|> user \n {user} <|im_end|> \n <|im_start|> ass istant \n   -> 9 + U masked tokens
    #   {assistant} <|im_end|>                                                  -> A + 1 trained tokens
    #   \n                                                                      -> 1 masked token
    # "hi" / "ok" are one token each and " hi" / " ok" too, so U and A are the word counts.
    # With max_seq_len = 16 the model sees positions 0..15:
    rows = [
        chat("hi", "ok"),                      # 1: 13 tokens: fits
        chat("hi", " ".join(["ok"] * 8)),      # 2: 20 tokens, trained 10..18: 6 kept, 3 cut -> partly
        chat(" ".join(["hi"] * 8), "ok"),      # 3: 20 tokens, trained 17..18: all cut -> entirely
        chat(" ".join(["hi"] * 6), "ok"),      # 4: 18 tokens, trained 15..16: 1 kept -> partly
        chat("hi", " ".join(["ok"] * 5)),      # 5: 17 tokens, trained 10..15: over, completion intact
    ]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    rep = audit([f], renderer=chatml, max_seq_len=16, near_dups=False)
    L = rep.sections["lengths"]
    assert L["unit"] == "tokens"
    assert (L["over_max_seq_len"], L["completion_cut_partly"], L["completion_cut_entirely"]) == (4, 2, 1)
    ex = L["examples"]
    assert ex["over_max_seq_len"] == [f"{f}:{k}" for k in (2, 3, 4, 5)]
    assert ex["completion_cut_partly"] == [f"{f}:2", f"{f}:4"]
    assert ex["completion_cut_entirely"] == [f"{f}:3"]
    tc = rep.results["lengths"]
    assert (L["total"]["min"], L["total"]["max"]) == (13, 20)
    assert L["completion"]["max"] == 9 and L["prompt"]["max"] == 18  # 17 + the trailing newline
    codes = {x.code: x for x in rep.findings}
    assert codes["over_max_seq_len"].count == 4 and codes["completion_truncated"].count == 2 and codes["completion_lost"].count == 1
    assert tc.counted == 5


def test_word_count_fallback_hand_computed(tmp_path):
    rows = [chat("a b c", "d e"), chat("a b c d e f g h", "i j"), chat("a", "b c d e f g h i j")]
    f = write_jsonl(tmp_path / "w.jsonl", rows)
    rep = audit([f], renderer=None, max_seq_len=6, near_dups=False)
    L = rep.sections["lengths"]
    # totals 5, 10, 10; prompt words 3, 8, 1: record 2 loses all (8 >= 6), record 3 part (1 + 5 kept of 9)
    assert L["unit"] == "words" and L["total"]["max"] == 10
    assert (L["over_max_seq_len"], L["completion_cut_partly"], L["completion_cut_entirely"]) == (2, 1, 1)
    assert "no_tokenizer" in rep.codes("info")


def _records(paths):
    recs, issues = [], []
    for p in paths:
        info, rs = read_file(str(p), "train", "auto", None, len(recs), issues)
        check_and_convert(rs, info, Tally())
        recs += rs
    return recs


def _mixed_rows(n=100, seed=0):
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        w = lambda m: " ".join(rng.choices(VOCAB, k=m))  # noqa: E731
        kind = k % 4
        if kind == 0:
            rows.append({"instruction": w(8), "input": w(rng.randint(0, 20)), "output": w(rng.randint(5, 120)) + "  "})
        elif kind == 1:
            rows.append({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": w(6)},
                                           {"from": "gpt", "value": w(9)}, {"from": "human", "value": w(4) + " \u00e9t\u00e9 <b>"},
                                           {"from": "gpt", "value": w(30)}]})
        elif kind == 2:
            rows.append({"prompt": w(20) + "\n", "completion": w(2) + "<|endoftext|>"})
        else:
            rows.append({"text": w(rng.randint(50, 300))})
    return rows


@pytest.mark.parametrize("template,train_on", [("auto", "assistant"), ("chatml", "last_assistant"), ("llama3", "assistant"),
                                               ("alpaca", "assistant"), ("mistral", "all")])
def test_fast_counts_equal_encode_many(tmp_path, tokenizer, template, train_on):
    from tunelab.data.render import Renderer

    r = Renderer(tokenizer, template, train_on)
    rows = _mixed_rows()
    paths = []
    for kind in range(4):  # one format per file
        paths.append(write_jsonl(tmp_path / f"k{kind}.jsonl", rows[kind::4]))
    recs = _records(paths)
    tc = count_tokens(recs, r, max_seq_len=64)
    assert tc.fast == len(recs) and tc.slow == 0 and not tc.note
    exs, _ = r.encode_many([x.conv for x in recs], None, "drop", check_parity=False)
    for rec, ex in zip(recs, exs):
        assert ex.source == rec.where
        assert _from_labels(ex.labels, 64) == (tc.total[rec.idx], tc.trained[rec.idx], tc.kept_trained[rec.idx]), rec.where


def test_sampled_lengths_keep_exact_truncation_counts(tmp_path, chatml):
    rng = random.Random(3)
    rows = [chat(" ".join(rng.choices(VOCAB, k=5)), " ".join(rng.choices(VOCAB, k=rng.randint(3, 30)))) for _ in range(300)]
    rows += [chat(" ".join(rng.choices(VOCAB, k=5)), " ".join(rng.choices(VOCAB, k=600))) for _ in range(7)]  # over 512
    f = write_jsonl(tmp_path / "s.jsonl", rows)
    full = audit([f], renderer=chatml, max_seq_len=512, near_dups=False, length_sample=None)
    sampled = audit([f], renderer=chatml, max_seq_len=512, near_dups=False, length_sample=50)
    a, b = full.sections["lengths"], sampled.sections["lengths"]
    assert not a["percentiles_sampled"] and b["percentiles_sampled"]
    for k in ("over_max_seq_len", "completion_cut_partly", "completion_cut_entirely"):
        assert a[k] == b[k]
    assert a["over_max_seq_len"] == 7
    assert b["records_within_bound"] > 200 and "sample of 50" in b["note"]


def test_template_errors_are_findings(tmp_path, tokenizer):
    from tunelab.data.render import Renderer

    class Strict(Renderer):
        """A template that rejects tool turns, as some chat templates do (raise_exception)."""

        def render(self, messages, add_generation_prompt=False):
            if any(m["role"] == "tool" for m in messages):
                raise ValueError("Conversation roles must alternate user/assistant")
            return super().render(messages, add_generation_prompt)

    rows = [chat("hi", "yo"),
            {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]}]
    f = write_jsonl(tmp_path / "roles.jsonl", rows)
    rep = audit([f], renderer=Strict(tokenizer, "chatml"))
    (t,) = rep.finding("template_error")
    assert t.severity == "error" and t.examples == [f"{f}:2"] and "alternate" in t.message
