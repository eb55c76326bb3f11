"""Scoring a model on a set of records: generate, clean, compare; loss and perplexity.

Generation uses the run's training template (``load_for_inference``), greedy and batched
(``infer.generate.generate_batched``), stopping at the end-of-turn token. Completions and
references are compared after stripping the end-of-turn marker and every artifact the audit
knows about (special tokens and template markers, ``audit.artifacts.strip_markers``: T0's
completions end in a literal ``<|endoftext|>``). Records with the same prompt are one item
with several references. The loss is the token mean over the completions (the training loss,
``train.evaluate.loss_sums``), perplexity its exp.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..audit.artifacts import strip_markers
from ..data.formats import Conversation
from ..data.render import EncodedExample
from ..infer.generate import Loaded, generate_batched
from ..train.evaluate import loss_sums, mean_loss
from ..train.loss import CausalLMLoss
from .metrics import bleu_score, exact_match, exact_match_score, rouge_l_score


@dataclass
class Item:
    """One prompt and its references (all records that share the prompt)."""

    prompt: list[dict]
    refs: list[str]
    sources: list[str]
    convs: list[Conversation] = field(default_factory=list)


@dataclass
class Scored:
    n: int
    metrics: dict[str, float]
    predictions: list[str]
    correct: list[bool]
    items: list[Item]

    def rows(self) -> list[dict]:
        return [{"source": it.sources[0], "prompt": it.prompt[-1]["content"], "prediction": p, "references": it.refs, "exact_match": c}
                for it, p, c in zip(self.items, self.predictions, self.correct)]


def clean(text: str) -> str:
    return strip_markers(text).strip()


def items_from(convs: Sequence[Conversation]) -> list[Item]:
    """Items from conversations ending in an assistant turn; raw text has no prompt and is skipped."""
    by_prompt: dict[str, Item] = {}
    for c in convs:
        if c.is_text or not c.messages or c.messages[-1]["role"] != "assistant":
            continue
        prompt = c.messages[:-1]
        key = json.dumps(prompt, sort_keys=True)
        it = by_prompt.setdefault(key, Item(prompt, [], []))
        it.refs.append(clean(c.messages[-1]["content"]))
        it.sources.append(c.source)
        it.convs.append(c)
    return list(by_prompt.values())


def model_dtype(model: Any) -> torch.dtype:
    """The dtype the base model computes in (adapter weights may be fp32 on a bf16 base)."""
    return next(p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point())


def loss_on(loaded: Loaded, examples: Sequence[EncodedExample], batch_size: int = 8) -> float:
    """Mean token loss of ``loaded.model`` over the trained tokens of ``examples``."""
    if not examples:
        return float("nan")
    loss_fn = CausalLMLoss(loaded.model, trained_logits_only=True, fused_decoder=False)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.renderer.stop_token_ids[0]
    return mean_loss(loss_sums(loss_fn, examples, batch_size, pad, loaded.device, model_dtype(loaded.model)))


def score(loaded: Loaded, items: Sequence[Item], metrics: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16,
          max_seq_len: int = 1024, on_batch: Optional[Callable[[int], None]] = None) -> Scored:
    """Generate for every item (when a generation metric is asked) and compute ``metrics``."""
    items = list(items)
    out: dict[str, float] = {}
    preds: list[str] = []
    correct: list[bool] = []
    if any(m in metrics for m in ("em", "bleu", "rougeL")):
        preds = [clean(p) for p in generate_batched(loaded, [it.prompt for it in items], max_new_tokens, batch_size, on_batch)]
        refs = [it.refs for it in items]
        correct = [exact_match(p, r) for p, r in zip(preds, refs)]
        if "em" in metrics:
            out["em"] = exact_match_score(preds, refs)
        if "bleu" in metrics:
            out["bleu"] = bleu_score(preds, refs)
        if "rougeL" in metrics:
            out["rougeL"] = rouge_l_score(preds, refs)
    if "loss" in metrics:
        examples, _ = loaded.renderer.encode_many([c for it in items for c in it.convs], max_seq_len, "truncate_prompt")
        out["loss"] = loss_on(loaded, examples)
        out["ppl"] = math.exp(out["loss"]) if math.isfinite(out["loss"]) and out["loss"] < 700 else float("inf")
    return Scored(len(items), out, preds, correct, items)
