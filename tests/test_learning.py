"""The recipe learns: on a learnable toy task LoRA cuts the loss by at least half in 100 steps.

Why the toy model differs from conftest's ``make_tiny_llama``: LoRA trains neither the
embeddings nor the (tied) output head, so the frozen base must already tell tokens apart.

* With the default ``initializer_range=0.02`` and hidden 64, every logit is ~N(0, 0.16^2):
  the output is near uniform (loss ~ ln(49152) = 10.8) and no adapter can make one token
  stand out. With std 0.2 a hidden state aligned with a token's embedding gives that token a
  logit far above the rest, as in a pretrained model.
* ``pad_token_id`` is left unset: transformers zeroes the embedding row of the pad token, and
  SmolLM2's pad is ``<|im_end|>``, so its logit would be stuck at 0 and the model could never
  learn to end a turn. tunelab masks padding by position, so the model's pad id is irrelevant.
"""

from __future__ import annotations

import io
import json

from rich.console import Console

from tinymodels import make_learnable_llama, write_jsonl
from tunelab.config import config_from_dict
from tunelab.train.recipe import train



WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]




def test_lora_halves_the_loss_within_100_steps(tmp_path, tokenizer):
    model_dir = make_learnable_llama(tmp_path / "model", tokenizer)
    # Copy task: the answer is a word of the prompt, then <|im_end|>. Learnable only by
    # attending to the prompt (the 8 answers differ), and the end-of-turn token must be learnt.
    data = write_jsonl(tmp_path / "copy.jsonl", [{"instruction": f"Repeat the word: {w}", "output": w} for w in WORDS])
    cfg = config_from_dict({
        "name": "learn", "output_dir": str(tmp_path / "run"),
        "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "audit": "off"},
        "lora": {"rank": 8, "targets": "all-linear", "dropout": 0.0},
        "train": {"max_steps": 100, "batch_size": 8, "lr": 1e-2, "warmup": 0.05, "seed": 0},
    })
    res = train(cfg, console=Console(file=io.StringIO()))
    assert len(res.losses) == 100 and res.steps == 100
    first, last = res.losses[0], res.losses[-1]
    assert 9.0 < first < 14.0, f"an untrained model should be near ln(vocab), got {first}"
    assert last <= 0.5 * first, f"loss fell only from {first:.3f} to {last:.3f}"
    # the trace of the whole run is in metrics.jsonl, one line per step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows if r["event"] == "train"] == res.losses
    # it is learning, not noise: the mean of the last 10 losses is far below the first 10
    assert sum(res.losses[-10:]) < 0.5 * sum(res.losses[:10])
