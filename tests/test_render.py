"""Templates and loss masking: exactly the assistant tokens plus each turn's end-of-turn token
are trained; the inference prompt is the training prefix; pad == eos still trains the eos."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.batching import collate
from tunelab.data.formats import Conversation
from tunelab.data.render import BUILTIN_TEMPLATES, IGNORE, Renderer, TemplateParityError

MULTI = Conversation(messages=[
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
], source="test:1")

EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": None}  # None: the tokenizer's eos


def trained_runs(ex) -> list[list[int]]:
    runs, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            assert lab == tid  # labels are the token ids themselves (the model shifts)
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("template", ["chatml", "llama3", "alpaca", "auto"])
def test_exactly_assistant_tokens_and_eot_are_trained(tokenizer, template):
    r = Renderer(tokenizer, template)
    (ex,), _ = r.encode_many([MULTI])
    eot = EOT.get(template) or tokenizer.eos_token
    runs = [tokenizer.decode(run) for run in trained_runs(ex)]
    assert runs == ["Hello! How can I help?" + eot, "4, of course." + eot]
    # every other token is masked: the counts add up exactly
    n_expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in runs)
    assert ex.n_trained == n_expected


@pytest.mark.parametrize("template", ["chatml", "llama3", "alpaca"])
def test_train_on_variants(tokenizer, template):
    eot = EOT.get(template) or tokenizer.eos_token
    (last,), _ = Renderer(tokenizer, template, train_on="last_assistant").encode_many([MULTI])
    assert [tokenizer.decode(x) for x in trained_runs(last)] == ["4, of course." + eot]
    (every,), _ = Renderer(tokenizer, template, train_on="all").encode_many([MULTI])
    assert every.labels == every.input_ids
    (asst,), _ = Renderer(tokenizer, template, train_on="assistant").encode_many([MULTI])
    assert last.n_trained < asst.n_trained < every.n_trained


def test_pad_equal_to_eos_still_trains_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: pad == eos == <|im_end|>
    r = Renderer(tokenizer, "chatml")
    short = Conversation(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    exs, _ = r.encode_many([MULTI, short])
    b = collate(exs, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    # the eos that closes each assistant turn is trained, in the padded row too
    for row in range(2):
        trained_eos = ((b.labels[row] == eos)).sum().item()
        assert trained_eos == sum(1 for run in trained_runs(exs[row]) if run[-1] == eos) >= 1
    # padding: same token id as eos, but masked by position
    pad_pos = b.attention_mask[1] == 0
    assert pad_pos.any() and (b.input_ids[1][pad_pos] == eos).all() and (b.labels[1][pad_pos] == IGNORE).all()
    assert b.n_trained == sum(int((torch.tensor(e.labels[1:]) != IGNORE).sum()) for e in exs)


@pytest.mark.parametrize("template", ["auto", *BUILTIN_TEMPLATES])
def test_inference_prompt_is_training_prefix(tokenizer, template):
    r = Renderer(tokenizer, template)
    (ex,), _ = r.encode_many([MULTI])
    for i, m in enumerate(MULTI.messages):
        if m["role"] != "assistant":
            continue
        p = r.prompt_ids(MULTI.messages[:i])
        assert ex.input_ids[: len(p)] == p, template
        # the first trained token of this turn comes right after the prompt
        assert ex.labels[len(p) - 1] == IGNORE or template == "plain"
        assert ex.labels[len(p)] != IGNORE


def test_non_prefix_stable_template_fails_loudly(tokenizer):
    # A template that rewrites earlier turns once a later one exists (like templates that
    # strip reasoning from past turns) breaks parity: tunelab must refuse it.
    bad = ("{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
           "{% else %}<|im_start|>assistant\n[hidden]<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = tokenizer
    old = tok.chat_template
    try:
        tok.chat_template = bad
        r = Renderer(tok, "auto")
        with pytest.raises(TemplateParityError, match="not prefix-stable"):
            r.encode_many([MULTI])
    finally:
        tok.chat_template = old


def test_masks_come_from_offsets_not_piecewise_tokenization(tokenizer):
    # GPT-2-style BPE merges "\n\n" differently when a word follows. The prompt of llama3 ends
    # in "\n\n"; the training tokens of that prompt must still equal the inference tokens.
    r = Renderer(tokenizer, "llama3")
    conv = Conversation(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "Hello"}])
    (ex,), _ = r.encode_many([conv])
    p = r.prompt_ids(conv.messages[:1])
    assert ex.input_ids[: len(p)] == p
    assert tokenizer.decode(p).endswith("<|end_header_id|>\n\n")


def test_truncation_drop_and_truncate_prompt(tokenizer):
    r = Renderer(tokenizer, "chatml")
    long_prompt = Conversation(messages=[{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "short answer"}], source="f:1")
    long_answer = Conversation(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}], source="f:2")
    ok = Conversation(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], source="f:3")
    (full_lp, full_la, full_ok), _ = r.encode_many([long_prompt, long_answer, ok])
    exs, st = r.encode_many([long_prompt, long_answer, ok], max_seq_len=64, truncation="drop")
    assert [e.source for e in exs] == ["f:3"] and st.dropped_too_long == 2 and st.kept == 1
    exs, st = r.encode_many([long_prompt, long_answer, ok], max_seq_len=64, truncation="truncate_prompt")
    by = {e.source: e for e in exs}
    # the long prompt is cut from the left; its completion stays whole
    assert len(by["f:1"]) == 64 and by["f:1"].n_trained == full_lp.n_trained and by["f:1"].input_ids == full_lp.input_ids[-64:]
    assert st.prompt_truncated == 1
    # the completion alone exceeds the limit: it keeps what fits and is counted as cut
    assert len(by["f:2"]) == 64 and 0 < by["f:2"].n_trained < full_la.n_trained and st.completion_truncated == 1
    assert by["f:3"].input_ids == full_ok.input_ids


def test_text_records_train_every_token_and_end_with_eos(tokenizer):
    r = Renderer(tokenizer, "chatml")
    (ex,), _ = r.encode_many([Conversation(text="Some general web text.")])
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tokenizer.eos_token_id


def test_preview_segments(tokenizer):
    r = Renderer(tokenizer, "chatml")
    seg = r.segments(MULTI)
    assert "".join(s["text"] for s in seg["segments"]) == r.render(MULTI.messages)
    assert [s["text"] for s in seg["segments"] if s["trained"]] == ["Hello! How can I help?<|im_end|>", "4, of course.<|im_end|>"]
    assert seg["n_trained"] < seg["n_tokens"]
