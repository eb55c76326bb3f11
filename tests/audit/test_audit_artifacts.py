"""Format consistency and artifacts."""

from __future__ import annotations

from audit_helpers import alpaca, audit, write_jsonl


def test_planted_artifacts(tmp_path, chatml):
    long = "This answer explains the idea step by step with enough words to be a typical answer here. " * 3
    rows = [
        alpaca("Say yes.", "yes<|endoftext|>"),                         # 1 special token of the tokenizer: error
        alpaca("[INST] Be nice [/INST]", "Sure."),                      # 2 another template's markers: warning
        alpaca("Write the reply.", "### Response: fine"),               # 3 marker: warning
        alpaca("Empty?", "<|im_end|>"),                                 # 4 only a special token: artifact-only
        alpaca("Who are you?", "I am {{name}}, made by {{author}}."),   # 5 placeholder
        alpaca("Summarize the text about the brown fox", "Summarize the text about the brown fox. The fox is quick."),  # 6 echo
        alpaca("Trailing?", "Yes.\n\n"),                                # 7 completion whitespace
        alpaca("  Leading prompt", "Ok."),                              # 8 prompt whitespace
    ]
    rows += [alpaca(f"Explain topic {k}.", long + str(k)) for k in range(30)]  # typical long answers
    rows += [alpaca("Explain topic x.", "No.")]                          # 39 very short answer
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    rep = audit([f], renderer=chatml, near_dups=False)
    by = {x.code: x for x in rep.findings}
    w = lambda n: f"{f}:{n}"  # noqa: E731
    assert by["special_token_in_text"].severity == "error"
    assert set(by["special_token_in_text"].examples) == {w(1), w(4)}
    assert "<|endoftext|> in 1 completions" in by["special_token_in_text"].message
    assert by["template_marker_in_text"].severity == "warning"
    assert set(by["template_marker_in_text"].examples) == {w(2), w(3)}
    assert by["artifact_only_completion"].examples == [w(4)] and by["artifact_only_completion"].severity == "error"
    assert by["placeholder_in_text"].examples == [w(5)] and "{{name}}" in by["placeholder_in_text"].message
    assert by["completion_repeats_prompt"].examples == [w(6)]
    assert by["completion_whitespace"].examples == [w(7)]
    assert by["prompt_whitespace"].examples == [w(8)] and by["prompt_whitespace"].severity == "info"
    short = set(by["short_completion"].examples)
    assert w(39) in short and not short & {w(k) for k in range(9, 39)}  # the typical answers are not outliers
    markers = {m["marker"]: m for m in rep.sections["artifacts"]["markers"]}
    assert markers["<|endoftext|>"]["severity"] == "error" and markers["[INST]"]["severity"] == "warning"


def test_special_tokens_without_a_tokenizer(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [alpaca("Hi", "there<|endoftext|>"), alpaca("Hi <s>", "there")])
    rep = audit([f], renderer=None, near_dups=False)
    (e,) = rep.finding("special_token_in_text")
    assert e.examples == [f"{f}:1"]  # <|...|> tokens are assumed to be control tokens
    (m,) = rep.finding("template_marker_in_text")
    assert m.examples == [f"{f}:2"]  # <s> is HTML too: only a warning without a tokenizer to ask


def test_mixed_formats_and_field_sets(tmp_path):
    rows = [alpaca(f"Q{k}", f"A{k}") for k in range(5)]
    rows += [{"instruction": "Q5", "output": "A5"}]  # no input field: same format, other field set
    rows += [{"instruction": "Q6", "input": "", "output": "A6", "extra": 1}]
    rows += [{"prompt": "Q7", "completion": "A7"}]  # another format
    f = write_jsonl(tmp_path / "m.jsonl", rows)
    rep = audit([f], near_dups=False)
    assert rep.finding("mixed_formats")[0].examples == [f"{f}:8"]
    assert set(rep.finding("mixed_field_sets")[0].examples) == {f"{f}:6", f"{f}:7", f"{f}:8"}
    assert rep.finding("mixed_field_sets")[0].severity == "info"
    assert rep.files[0].formats == {"alpaca": 7, "flan": 1}
