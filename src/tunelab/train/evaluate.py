"""Loss over a dataset: the one eval loop that the recipe's evals, the QLoRA quantization cost
and ``tunelab eval`` share.

The loss is the mean over every trained token of the dataset (sum of token losses / trained
tokens), the same normalisation as training (docs/practices.md#sft-objective), not a mean of
per-example means.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Sequence

import torch

from ..data.batching import collate
from ..data.render import EncodedExample


def autocast_for(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Autocast to ``dtype`` on ``device``; a no-op for fp32 (autocast to fp32 is not a thing)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """``module`` in eval mode (no dropout) for the block; every submodule's mode restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]  # restored as they were, module by module
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def loss_sums(loss_fn: Any, examples: Sequence[EncodedExample], batch_size: int, pad_id: int, device: torch.device,
              dtype: torch.dtype = torch.float32, rank: int = 0, world: int = 1) -> torch.Tensor:
    """(sum of token losses, trained tokens) as a float64 tensor (2,) over this process's share.

    ``loss_fn`` is a :class:`train.loss.CausalLMLoss` (or anything with its signature). Examples
    are sorted by length (less padding), then dealt round-robin to the ``world`` processes, so
    the per-process sums add up (``accelerator.reduce(..., "sum")``) to the whole dataset's.
    ``loss_fn`` is put in eval mode (no dropout) for the loop; every module's mode is restored afterwards.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    mine = order[rank::world]
    total = torch.zeros(2, device=device, dtype=torch.float64)
    with eval_mode(loss_fn), torch.no_grad(), autocast_for(device, dtype):
        for s in range(0, len(mine), batch_size):
            b = collate([examples[i] for i in mine[s:s + batch_size]], pad_id).to(device)
            loss_sum, n = loss_fn(b.input_ids, b.attention_mask, b.labels)
            total += torch.stack([loss_sum.detach().double(), n.double()])
    return total


def mean_loss(sums: torch.Tensor) -> float:
    """Mean token loss from :func:`loss_sums` (0 trained tokens: nan)."""
    n = float(sums[1])
    return float(sums[0]) / n if n > 0 else float("nan")
