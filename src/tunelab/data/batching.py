"""Batch order (seeded, length-grouped), splitting by tokens, and collation (right padding,
masked by position, untrained tails dropped)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .render import IGNORE, EncodedExample


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, length_grouping: bool = True, group_factor: int = 64) -> list[list[int]]:
    """The micro-batches of one epoch as lists of example indices.

    Deterministic in (seed, epoch) and independent of the global RNG, so a resumed run
    replays the same order. With length grouping, indices are shuffled, cut into groups of
    ``batch_size * group_factor``, sorted by length inside each group, cut into batches, and
    the batches shuffled again: similar lengths share a batch (less padding) while the
    order stays random (HF's LengthGroupedSampler idea).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not length_grouping:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    group = batch_size * group_factor
    batches: list[list[int]] = []
    for s in range(0, len(order), group):
        chunk = sorted(order[s:s + group], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


class MicroBatchStream:
    """Global micro-batch g of the run: epochs laid end to end, each in its seeded order.

    The order is a function of (seed, epoch) alone, never of the number of processes: with N
    processes and grad_accum A, optimizer step s consumes the global micro-batches
    [s*A*N, (s+1)*A*N), process r taking g = s*A*N + j*N + r for j < A. So a run with N
    processes and one with 1 process and A*N accumulation steps see the same global batches in
    the same order, and a position g saved by one resumes on any other world size. Stateless
    apart from a cache, so g fully defines the data.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, grouping: bool):
        self.lengths, self.batch_size, self.seed, self.grouping = lengths, batch_size, seed, grouping
        self.per_epoch = math.ceil(len(lengths) / batch_size)  # global micro-batches per epoch
        if self.per_epoch == 0:
            raise ValueError("no training examples")
        self._epoch = -1
        self._batches: list[list[int]] = []

    def __getitem__(self, g: int) -> list[int]:
        epoch, i = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            self._batches = epoch_batches(self.lengths, self.batch_size, self.seed, epoch, self.grouping)
            self._epoch = epoch
        return self._batches[i]

    def for_step(self, first: int, grad_accum: int, rank: int, world: int) -> list[list[int]]:
        """This process's micro-batches of the step whose first global micro-batch is ``first``."""
        return [self[first + j * world + rank] for j in range(grad_accum)]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 0 on padding
    labels: torch.Tensor  # (B, T) long, IGNORE on untrained and padding positions

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def n_trained(self) -> int:
        """Tokens that carry loss: labels shifted by one (token t is predicted at t-1)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def n_real(self) -> int:
        return int(self.attention_mask.sum())


def trained_length(e: EncodedExample) -> int:
    """Tokens of ``e`` that can affect its loss: up to its last trained label.

    A causal model's output at position t depends on tokens 0..t only, and the last trained
    label is predicted at the position before it, so later tokens (e.g. the newline a chat
    template adds after the end-of-turn token) change nothing but the cost. An example with no
    trained label keeps its full length (it is evaluated as is).
    """
    labels = e.labels
    j = len(labels) - 1
    while j > 0 and labels[j] == IGNORE:
        j -= 1
    return j + 1 if labels[j] != IGNORE else len(labels)


def split_by_tokens(examples: Sequence[EncodedExample], max_tokens: Optional[int], trim: bool = True) -> list[list[EncodedExample]]:
    """Cut a micro-batch into consecutive parts of at most ``max_tokens`` real tokens each, as
    evenly as possible (an example longer than that is a part on its own). The parts are run
    as separate forward/backward passes whose gradients add up: the same loss and gradients as
    the whole micro-batch, with activation memory bounded by ``max_tokens``."""
    examples = list(examples)
    if not max_tokens or len(examples) <= 1:
        return [examples]
    lens = [trained_length(e) if trim else len(e) for e in examples]
    total = sum(lens)
    if total <= max_tokens:
        return [examples]
    k = -(-total // max_tokens)
    target = total / k
    parts: list[list[EncodedExample]] = []
    cur: list[EncodedExample] = []
    acc = 0
    for e, n in zip(examples, lens):
        if cur and (acc + n > max_tokens or (acc + n / 2 > target and len(parts) < k - 1)):
            parts.append(cur)
            cur, acc = [], 0
        cur.append(e)
        acc += n
    parts.append(cur)
    return parts


def collate(examples: Sequence[EncodedExample], pad_id: int, trim: bool = True) -> Batch:
    """Right-pad to the longest example. Padding is masked by position (attention_mask=0,
    label=IGNORE), never by token id, so pad == eos cannot hide a trained eos.

    ``trim`` drops each example's tokens after its last trained label (see
    :func:`trained_length`): the loss and gradients are unchanged, the compute is not spent."""
    lens = [trained_length(e) if trim else len(e) for e in examples]
    T = max(lens)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (e, n) in enumerate(zip(examples, lens)):
        ids[i, :n] = torch.tensor(e.input_ids[:n])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels[:n])
    return Batch(ids, mask, labels)
