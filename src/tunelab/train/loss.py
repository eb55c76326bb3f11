"""Next-token cross-entropy summed over trained positions only.

The recipe divides the sum by the number of trained tokens in the whole effective batch
(all micro-batches of an optimizer step, all processes), so the loss is the mean over
trained tokens, not a mean of per-example or per-micro-batch means that over-weights
short completions and skews with gradient accumulation.

Fast path (``trained_logits_only``): run the decoder, keep the hidden states of positions
whose next token is trained, and apply lm_head there only. With completions around half the
tokens and a 49k vocabulary, that skips most of the largest matmul and its (B, T, V) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.render import IGNORE

CE_CHUNK_ROWS = 2048  # rows of logits materialised at once: 2048 x 49k x 4 B = 400 MB max


def _unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class CausalLMLoss(nn.Module):
    """Wraps a causal LM; forward returns (sum of token losses, number of trained tokens).

    A module (rather than a function) so that DDP/FSDP wrap it and see the forward.
    """

    def __init__(self, model: nn.Module, trained_logits_only: bool = True):
        super().__init__()
        self.model = model
        self.trained_logits_only = trained_logits_only

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        keep = targets != IGNORE
        n = keep.sum()
        if not self.trained_logits_only:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
            return loss, n
        lm = _unwrap_causal_lm(self.model)
        decoder = lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        h = hidden[:, :-1][keep]  # (N, H): only positions whose next token is trained
        y = targets[keep]  # (N,)
        head = lm.get_output_embeddings()
        loss = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], CE_CHUNK_ROWS):
            logits = head(h[s:s + CE_CHUNK_ROWS]).float()  # (n, V)
            loss = loss + F.cross_entropy(logits, y[s:s + CE_CHUNK_ROWS], reduction="sum")
        if h.shape[0] == 0:
            loss = loss + 0.0 * hidden.sum()  # keep the graph connected (DDP needs every step to backprop)
        return loss, n
