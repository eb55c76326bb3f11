"""The replay buffer (``data.replay: {path, fraction}``): general text mixed into training.

A little general or pretraining text among the task examples reduces catastrophic forgetting
(docs/practices.md#reg-replay). ``fraction`` is the share of the *trained tokens* of an epoch
that come from replay: replay tokens R and task tokens T give R / (R + T) = fraction. Every
token of a replay record is trained (LM loss), whatever ``data.train_on`` says: raw text
(``{"text": ...}``) is already all trained; instruction records are rendered with
``train_on: all``. Documents longer than ``data.max_seq_len`` are cut into windows of at most
that many tokens, so no replay text is dropped for length.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import ReplayConfig
from .formats import load_dataset_file
from .render import EncodedExample, Renderer

REPLAY_TASK = "replay"


@dataclass
class ReplayStats:
    path: str
    fraction: float  # the configured share of trained tokens
    records: int  # replay examples added (windows, with repeats)
    distinct: int  # distinct replay windows available
    tokens: int  # trained tokens of the added examples
    task_tokens: int  # trained tokens of the task examples

    @property
    def achieved(self) -> float:
        total = self.tokens + self.task_tokens
        return self.tokens / total if total else 0.0

    def summary(self) -> str:
        rep = f" (each window {self.records / self.distinct:.1f}x)" if self.records > self.distinct else ""
        return (f"replay {Path(self.path).name}: {self.records} examples{rep}, {self.tokens} of {self.tokens + self.task_tokens} "
                f"trained tokens = {100 * self.achieved:.1f}% (asked {100 * self.fraction:.1f}%)")


def windows(ex: EncodedExample, max_len: int) -> list[EncodedExample]:
    """``ex`` cut into pieces of at most ``max_len`` tokens (raw text: every token trained)."""
    if len(ex) <= max_len:
        return [ex]
    return [EncodedExample(ex.input_ids[s:s + max_len], ex.labels[s:s + max_len], ex.task, ex.source, truncated=True)
            for s in range(0, len(ex), max_len) if len(ex) - s >= 2]


def replay_examples(cfg: ReplayConfig, renderer: Renderer, task: Sequence[EncodedExample], max_len: int, seed: int,
                    on_error: str = "raise") -> tuple[list[EncodedExample], ReplayStats]:
    """Replay examples whose trained tokens make up ``cfg.fraction`` of (task + replay) tokens.

    Windows are drawn in a seeded order, cycling through the file when it is too small; one
    that would overshoot the target by more than leaving it out undershoots is skipped for a
    shorter one, until a whole pass adds nothing.
    """
    ds = load_dataset_file(cfg.path, cfg.format, on_error, task=REPLAY_TASK)
    all_tokens = copy.copy(renderer)
    all_tokens.train_on = "all"  # LM loss on every token of a replay record
    encoded, _ = all_tokens.encode_many(ds.conversations, None, "drop")
    pool = [w for ex in encoded for w in windows(EncodedExample(ex.input_ids, ex.labels, REPLAY_TASK, ex.source), max_len)]
    task_tokens = sum(e.n_trained for e in task)
    target = cfg.fraction * task_tokens / (1.0 - cfg.fraction)
    out: list[EncodedExample] = []
    got, skipped = 0, 0
    rng = random.Random(seed)
    order: list[int] = []
    while pool and got < target and skipped < len(pool):
        if not order:
            order = list(range(len(pool)))
            rng.shuffle(order)
        ex = pool[order.pop()]
        n = ex.n_trained
        if got + n > target and (got + n - target) > (target - got):
            skipped += 1  # overshoots by more than leaving it out undershoots: try a shorter one
            continue
        out.append(ex)
        got, skipped = got + n, 0
    return out, ReplayStats(cfg.path, cfg.fraction, len(out), len(pool), got, task_tokens)


def replay_share(examples: Sequence[EncodedExample], batches: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(replay trained tokens, all trained tokens) over the micro-batches a run consumed."""
    rep = tot = 0
    for mb in batches:
        for i in mb:
            n = examples[i].n_trained
            tot += n
            rep += n if examples[i].task == REPLAY_TASK else 0
    return rep, tot
