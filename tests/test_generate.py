"""Inference: ``load_for_inference(run_dir)`` + ``generate`` decode greedily by default, feed
the model the training template's prompt (token for token), and stop at the end-of-turn
token. A tiny model is trained to answer a fixed string, then ``<|im_end|>``."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from tinymodels import make_learnable_llama, write_jsonl
from tunelab.config import config_from_dict
from tunelab.data.pipeline import prepare_data
from tunelab.data.render import IGNORE, Renderer
from tunelab.infer.generate import generate, load_for_inference
from tunelab.train.recipe import train

CPU = torch.device("cpu")
ANSWER = "Hello there!"
PROMPTS = ["Greet me.", "Say hello.", "Hi!", "Open with a greeting."]






@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("gen")
    model_dir = make_learnable_llama(d / "model", tokenizer)
    data = write_jsonl(d / "train.jsonl", [{"instruction": p, "output": ANSWER} for p in PROMPTS])
    # chatml, not the tokenizer's own template (which adds a system prompt): inference must
    # use the run's template, whatever the tokenizer ships
    cfg = config_from_dict({
        "name": "gen", "output_dir": str(d / "run"), "template": "chatml",
        "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "audit": "off"},
        "lora": {"rank": 8, "targets": "all-linear", "dropout": 0.0},
        "train": {"max_steps": 30, "batch_size": 4, "lr": 1e-2, "warmup": 0.05, "seed": 0},
    })
    res = train(cfg, console=Console(file=io.StringIO()))
    assert res.losses[-1] < 0.1 * res.losses[0], f"the tiny model did not learn the answer: {res.losses[-5:]}"
    return cfg


def _greedy(model, ids: list[int], stop: set[int], max_new: int) -> list[int]:
    """Reference decoding: argmax of the full forward at every step, no cache."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt in stop:
                break
    return seq[len(ids):]


def test_generate_is_greedy_uses_the_template_and_stops_at_end_of_turn(run, tokenizer, monkeypatch):
    loaded = load_for_inference(str(run.run_dir), device=CPU)
    assert loaded.renderer.chat_template == Renderer(tokenizer, "chatml").chat_template

    calls = []
    real_generate = loaded.model.generate

    def spy(**kw):
        out = real_generate(**kw)
        calls.append((kw, out))
        return out

    monkeypatch.setattr(loaded.model, "generate", spy)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    outs = generate(loaded, conversations, max_new_tokens=24)
    assert outs == [ANSWER] * len(PROMPTS)

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    data = prepare_data(run, Renderer(tokenizer, run.template))
    by_prompt = {c.messages[0]["content"]: ex for c, ex in zip(data.train_conversations, data.train)}
    for msgs, (kw, out) in zip(conversations, calls):
        prompt = kw["input_ids"][0].tolist()
        # the prompt is the training template's prompt, token for token ...
        assert prompt == Renderer(tokenizer, "chatml").prompt_ids(msgs)
        assert prompt != Renderer(tokenizer, "auto").prompt_ids(msgs)
        # ... which is exactly the training example up to its first trained token
        ex = by_prompt[msgs[0]["content"]]
        first_trained = next(i for i, y in enumerate(ex.labels) if y != IGNORE)
        assert prompt == ex.input_ids[:first_trained]
        # greedy (no sampling) and stopped at <|im_end|>, long before max_new_tokens
        assert not kw.get("do_sample")
        new = out[0, len(prompt):].tolist()
        assert new[-1] == im_end and im_end not in new[:-1] and len(new) < 24
        assert tokenizer.decode(new[:-1]) == ANSWER
        assert new == _greedy(loaded.model, prompt, {im_end}, 24)


def test_generate_defaults_to_greedy(run):
    loaded = load_for_inference(str(run.run_dir), device=CPU)
    convs = [[{"role": "user", "content": "Something never seen in training, of some length."}]]
    a = generate(loaded, convs, max_new_tokens=8)
    torch.manual_seed(123)
    b = generate(loaded, convs, max_new_tokens=8)
    assert a == b  # deterministic whatever the RNG
    # and it is the argmax decoding
    ids = loaded.renderer.prompt_ids(convs[0])
    stop = set(loaded.renderer.stop_token_ids)
    ref = _greedy(loaded.model, ids, stop, 8)
    text = loaded.tokenizer.decode([t for t in ref if t not in stop], skip_special_tokens=False)
    assert a[0] == text.split("<|im_end|>")[0].strip()


def test_base_model_without_adapter_does_not_answer(run):
    """adapter=False loads the run's base alone: the answer comes from the adapter."""
    loaded = load_for_inference(str(run.run_dir), device=CPU, adapter=False)
    assert generate(loaded, [[{"role": "user", "content": PROMPTS[0]}]], max_new_tokens=6) != [ANSWER]
