"""Next-token cross-entropy summed over trained positions only, and the choice of path that computes it.

The recipe divides the sum by the number of trained tokens in the whole effective batch
(all micro-batches of an optimizer step, all processes), so the loss is the mean over
trained tokens, not a mean of per-example or per-micro-batch means that over-weights
short completions and skews with gradient accumulation.

Three levels, each switchable in ``TrainConfig`` (docs/performance.md has the measurements):

* reference (``trained_logits_only: false``): the transformers forward, full ``(B, T, V)``
  logits, ``F.cross_entropy``. Plain and slow; the tests compare the fast path against it.
* trained logits only: the transformers decoder, then lm_head + cross-entropy only at the
  positions whose next token is trained, by :func:`kernels.linear_ce.linear_cross_entropy`
  (row chunks, logits never kept for backward).
* fused decoder (``fused_decoder: true``, the default, for llama/mistral/qwen2 models with a
  frozen base and LoRA or no adapters, on the CPU): :class:`kernels.fused_llama.FusedLlama` on
  the rows that :func:`pack` lays end to end without padding, with a prompt prefix common to the
  examples of a pass computed once (``shared_prefix``). On CUDA the transformers forward with
  SDPA is used with trained-only logits. Models or setups the fused decoder does not support
  fall back to the transformers decoder, and the recipe logs why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.render import IGNORE
from ..kernels.fused_llama import FusedLlama, Group, Unsupported, unwrap_causal_lm
from ..kernels.linear_ce import CE_CHUNK_ROWS, linear_cross_entropy

# --------------------------------------------------------------------------- the loss module

MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth the extra attention calls


@dataclass
class Packed:
    ids: torch.Tensor  # (N,) token ids of the packed rows
    positions: torch.Tensor  # (N,) position of each row in its example
    targets: torch.Tensor  # (N,) the token each row predicts, IGNORE where untrained
    groups: list[Group]  # each example's rows, for attention
    shared_prefix: int  # tokens of the prefix stored once for all examples (0: none)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, share_prefix: bool = True,
         min_prefix: int = MIN_SHARED_PREFIX) -> Optional[Packed]:
    """A right-padded batch as packed rows without padding (None if some row is not right-padded).

    With ``share_prefix``, a prefix that every example starts with (e.g. a chat template's default
    system prompt) and that predicts no trained token is stored once: causal attention means its
    hidden states are the same in every example, so computing them once is exact, and every
    example's attention still sees it (its key/value gradients add up over the examples). Only
    the LoRA dropout masks on those rows are then shared by the examples of the pass.
    """
    B, T = input_ids.shape
    dev = input_ids.device
    lens = attention_mask.sum(1)
    ar = torch.arange(T, device=dev)
    real = ar[None, :] < lens[:, None]
    if not torch.equal(real, attention_mask.bool()):
        return None
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:].masked_fill(~real[:, 1:], IGNORE)  # the target predicted at each position
    P = 0
    if share_prefix and B > 1:
        ok = (input_ids == input_ids[:1]).all(0) & (nxt == IGNORE).all(0)
        P = min(int(ok.long().cumprod(0).sum()), int(lens.min()) - 1)
        P = P if P >= min_prefix else 0
    keep = real
    if P:
        keep = real.clone()
        keep[1:, :P] = False  # examples 1.. attend to example 0's copy of the prefix
    lens_l = lens.tolist()
    groups: list[Group] = [[(0, lens_l[0], True)]]
    at = lens_l[0]
    for n in lens_l[1:]:
        own = n - P
        groups.append(([(0, P, False)] if P else []) + [(at, at + own, True)])
        at += own
    return Packed(input_ids[keep], ar.expand(B, T)[keep], nxt[keep], groups, P)


class CausalLMLoss(nn.Module):
    """Wraps a causal LM; forward returns (sum of token losses, number of trained tokens).

    A module (rather than a function) so that DDP/FSDP wrap it and see the forward.
    """

    def __init__(self, model: nn.Module, trained_logits_only: bool = True, fused_decoder: bool = True, share_prefix: bool = True,
                 ce_chunk_rows: int = CE_CHUNK_ROWS):
        super().__init__()
        self.model = model
        self.trained_logits_only = trained_logits_only
        self.share_prefix = share_prefix
        self.ce_chunk_rows = ce_chunk_rows
        self.fused: Optional[FusedLlama] = None
        self.fused_reason = "off (train.fused_decoder: false)" if not fused_decoder else ""
        if fused_decoder and not trained_logits_only:
            self.fused_reason = "off (needs train.trained_logits_only)"
        elif fused_decoder:
            try:
                self.fused = FusedLlama(model)
                self.fused_reason = "on"
            except Unsupported as e:
                self.fused_reason = f"unsupported here: {e}"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        keep = targets != IGNORE
        n = keep.sum()
        if not self.trained_logits_only:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
            return loss, n
        lm = unwrap_causal_lm(self.model)
        head = lm.get_output_embeddings()
        fused = self.fused is not None and input_ids.device.type == "cpu"  # the model may have moved since
        packed = pack(input_ids, attention_mask, labels, self.share_prefix) if fused else None
        if packed is not None:
            with torch.autocast(input_ids.device.type, enabled=False):
                hidden = self.fused.hidden(packed.ids, packed.positions, packed.groups)  # (N, H)
                sel = (packed.targets != IGNORE).nonzero().squeeze(1)
                h = lm.model.norm(hidden.index_select(0, sel))
                loss = linear_cross_entropy(h, head.weight, packed.targets[sel], self.ce_chunk_rows)
                if sel.numel() == 0:
                    loss = loss + 0.0 * hidden.sum()  # keep the graph connected (DDP needs every step to backprop)
            return loss, n
        decoder = lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        h = hidden[:, :-1][keep]  # (N, H): only positions whose next token is trained
        loss = linear_cross_entropy(h, head.weight, targets[keep], self.ce_chunk_rows)
        if h.shape[0] == 0:
            loss = loss + 0.0 * hidden.sum()  # keep the graph connected (DDP needs every step to backprop)
        return loss, n

