"""``eval.generate_every``: exact match on a fixed sample of train and held-out prompts during
training, so the gap between what the model reproduces and what it generalizes to is a curve
over steps, not one number at the end (docs/practices.md#overfit-metrics).

The sample is drawn once (seeded) from the records that end in an assistant turn. Generation
is greedy with the training template and the KV cache (``models.generation.greedy_batched``),
on the model being trained, in eval mode (no dropout), and then the modes are restored. It
runs on the main process only: other processes wait at the barrier after it. Under FSDP the
weights are sharded and one process cannot generate alone, so the probe is off there (said once).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..audit.artifacts import strip_markers
from ..data.answers import exact_match
from ..data.formats import Conversation
from ..data.render import Renderer
from ..models.generation import greedy_batched
from .evaluate import autocast_for, eval_mode


@dataclass
class ProbeResult:
    train_em: float  # 0-100
    eval_em: float  # 0-100
    n_train: int
    n_eval: int

    @property
    def gap(self) -> float:
        return self.train_em - self.eval_em


def _sample(convs: Sequence[Conversation], k: int, seed: int) -> list[tuple[list[dict], str]]:
    """Up to ``k`` (prompt messages, reference) pairs, seeded; raw text has no prompt and is skipped."""
    pool = [c for c in convs if not c.is_text and c.messages and c.messages[-1]["role"] == "assistant"]
    pool = random.Random(seed).sample(pool, min(k, len(pool)))
    return [(c.messages[:-1], strip_markers(c.messages[-1]["content"]).strip()) for c in pool]


class GenerationProbe:
    """Greedy exact match on ``k`` train and ``k`` held-out prompts, as one call per probe."""

    def __init__(self, renderer: Renderer, tokenizer: Any, train: Sequence[Conversation], held_out: Sequence[Conversation],
                 k: int, max_new_tokens: int, batch_size: int, seed: int):
        self.renderer, self.tokenizer = renderer, tokenizer
        self.train = _sample(train, k, seed)
        self.held_out = _sample(held_out, k, seed + 1)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _em(self, model: Any, device: torch.device, pairs: list[tuple[list[dict], str]]) -> float:
        preds = greedy_batched(model, self.tokenizer, self.renderer, device, [p for p, _ in pairs], self.max_new_tokens,
                               self.batch_size)
        return 100.0 * sum(exact_match(strip_markers(p).strip(), [ref]) for p, (_, ref) in zip(preds, pairs)) / len(pairs)

    def __call__(self, model: Any, device: torch.device, dtype: torch.dtype) -> ProbeResult:
        with eval_mode(model), torch.no_grad(), autocast_for(device, dtype):
            tr, ev = self._em(model, device, self.train), self._em(model, device, self.held_out)
        return ProbeResult(tr, ev, len(self.train), len(self.held_out))
