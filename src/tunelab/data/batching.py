"""Batch order (seeded, length-grouped) and collation (right padding, masked by position)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def collate(examples: Sequence[EncodedExample], pad_id: int, pad_to_multiple: int = 1) -> Batch:
    """Right-pad to the longest example. Padding is masked by position (attention_mask=0,
    label=IGNORE), never by token id, so pad == eos cannot hide a trained eos."""
    T = max(len(e) for e in examples)
    if pad_to_multiple > 1:
        T = -(-T // pad_to_multiple) * pad_to_multiple
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)
