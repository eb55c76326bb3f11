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

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data.render import IGNORE
from ..kernels.fused_llama import FusedLlama, Group, Unsupported, unwrap_causal_lm
from ..kernels.liger import apply_liger, liger_linear_cross_entropy
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

    A module (rather than a function) so that DDP/FSDP wrap it and see the forward. The path is
    chosen once, at construction, from the switches and the model (``path`` says which and why):

    * ``fused CPU decoder``: :class:`FusedLlama` on packed rows (CPU, llama-family, frozen base);
    * ``packed HF forward + trained-only logits``: the transformers decoder on one row holding
      every example end to end, ``position_ids`` restarting at 0 for each; transformers' masking
      utilities (``masking_utils.find_packed_sequence_indices``) turn the restarts into a
      block-causal mask for sdpa/eager, and flash_attention_2 reads them as varlen sequence
      boundaries (``modeling_flash_attention_utils._is_packed_sequence``), so attention stays
      within each example and no compute goes to padding. A probe at construction checks that the
      model really does this (an old architecture that ignores the restarts would let examples
      attend to each other); if not, the padded forward is used and ``path`` says why;
    * ``padded HF forward + trained-only logits``: the right-padded batch with its attention mask;
    * ``reference``: full ``(B, T, V)`` logits and ``F.cross_entropy``.

    ``kernels="liger"`` (CUDA only) patches the model's RMSNorm, RoPE and SwiGLU with Liger-Kernel's
    Triton kernels and computes lm_head + cross-entropy with its fused linear cross-entropy.
    """

    def __init__(self, model: nn.Module, trained_logits_only: bool = True, fused_decoder: bool = True, share_prefix: bool = True,
                 ce_chunk_rows: int = CE_CHUNK_ROWS, padding_free: bool = True, kernels: str = "none",
                 compile_pointwise: bool = False):
        super().__init__()
        self.model = model
        self.trained_logits_only = trained_logits_only
        self.share_prefix = share_prefix
        self.ce_chunk_rows = ce_chunk_rows
        self.fused: Optional[FusedLlama] = None
        self.padding_free = False
        self.liger = False
        device = _device_of(model)
        if kernels not in ("none", "liger"):
            raise ValueError(f"train.kernels: {kernels!r} is not one of ['none', 'liger']")
        if not trained_logits_only:
            self.fused_reason = "off (train.trained_logits_only: false)"
            self.path = "reference: full logits (train.trained_logits_only: false)"
            if kernels == "liger":
                raise ValueError("train.kernels: liger needs train.trained_logits_only: true")
            return
        if kernels == "liger":
            self.liger = True
            self.fused_reason = "off (train.kernels: liger)"
            try:
                apply_liger(unwrap_causal_lm(model), device)
            except (ImportError, RuntimeError) as e:  # off CUDA, or the package is missing: the message says what to do
                raise ConfigError(str(e)) from None
        elif not fused_decoder:
            self.fused_reason = "off (train.fused_decoder: false)"
        else:
            try:
                self.fused = FusedLlama(model, compile_pointwise)
                self.fused_reason = "on, pointwise steps compiled" if compile_pointwise else "on"
            except Unsupported as e:
                self.fused_reason = f"unsupported here: {e}"
        if self.fused is not None:
            self.path = f"fused CPU decoder + trained-only logits ({device.type})"
            return
        why = ""
        if not padding_free:
            why = "train.padding_free: false"
        else:
            why = packed_forward_unsupported(unwrap_causal_lm(model))
            self.padding_free = not why
        head = "liger fused linear cross-entropy" if self.liger else "trained-only logits"
        kind = "packed" if self.padding_free else "padded"
        reasons = [] if self.fused_reason in ("on",) else [f"fused decoder {self.fused_reason}"]
        if why:
            reasons.append(f"padding-free off: {why}")
        self.path = f"{kind} HF forward + {head} ({device.type})" + (f"; {'; '.join(reasons)}" if reasons else "")

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
        packed = pack(input_ids, attention_mask, labels, self.share_prefix and fused) if (fused or self.padding_free) else None
        if packed is not None and fused:
            with torch.autocast(input_ids.device.type, enabled=False):
                hidden = self.fused.hidden(packed.ids, packed.positions, packed.groups)  # (N, H)
                sel = (packed.targets != IGNORE).nonzero().squeeze(1)
                h = lm.model.norm(hidden.index_select(0, sel))
                loss = linear_cross_entropy(h, head.weight, packed.targets[sel], self.ce_chunk_rows)
                if sel.numel() == 0:
                    loss = loss + 0.0 * hidden.sum()  # keep the graph connected (DDP needs every step to backprop)
            return loss, n
        decoder = lm.get_decoder()
        if packed is not None:
            # one row (1, N): attention_mask=None makes transformers derive the per-example
            # block-causal mask from the position restarts
            hidden = decoder(input_ids=packed.ids[None], position_ids=packed.positions[None], use_cache=False).last_hidden_state[0]  # (N, H)
            sel = (packed.targets != IGNORE).nonzero().squeeze(1)
            h, y = hidden.index_select(0, sel), packed.targets[sel]
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
            h, y = hidden[:, :-1][keep], targets[keep]  # (N, H): only positions whose next token is trained
        loss = liger_linear_cross_entropy(h, head.weight, y) if self.liger else linear_cross_entropy(h, head.weight, y, self.ce_chunk_rows)
        if h.shape[0] == 0:
            loss = loss + 0.0 * hidden.sum()  # keep the graph connected (DDP needs every step to backprop)
        return loss, n


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def packed_forward_unsupported(lm: nn.Module) -> str:
    """Why the transformers decoder of ``lm`` cannot run packed rows exactly ("" when it can).

    Checks the attention implementation, that the decoder takes ``position_ids``, and then runs a
    probe: two short sequences packed in one row must give the second one the same hidden states
    as when it runs alone (a decoder that ignored the position restarts would let it attend to the
    first). The probe runs without grad, in eval mode (no dropout), and restores every mode.
    """
    impl = getattr(getattr(lm, "config", None), "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        return f"attention implementation {impl!r} (packed rows need one of {', '.join(PACKED_ATTENTION)})"
    decoder = lm.get_decoder()
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return f"{type(decoder).__name__}.forward takes no position_ids"
    device = _device_of(lm)
    vocab = lm.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (5,), generator=g), torch.randint(0, vocab, (4,), generator=g)
    ids = torch.cat([a, b])[None].to(device)
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)
    modes = [(m, m.training) for m in lm.modules()]
    lm.eval()
    try:
        with torch.no_grad():
            packed = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0, 5:].float()
            alone = decoder(input_ids=b[None].to(device), use_cache=False).last_hidden_state[0].float()
            err = float((packed - alone).norm() / alone.norm().clamp(min=1e-12))
    except Exception as e:  # noqa: BLE001 - any failure means "not supported"; the padded path still works
        return f"the packed probe failed ({type(e).__name__}: {str(e)[:200]})"
    finally:
        for m, mode in modes:
            m.training = mode
    # bf16 kernels differ between the two calls by ~1e-2 relative at most; attending across the
    # boundary changes the states by O(1)
    if err > 5e-2:
        return f"the decoder lets packed examples attend to each other (relative difference {err:.2g} on a probe)"
    return ""
