"""What NF4 costs: the base model's eval loss quantized against unquantized (QLoRA runs).

QLoRA trades a little quality for memory (docs/practices.md#qlora-quality); a QLoRA run with an
eval set measures how much on the user's own data before it trains, over the same eval loop as
the recipe (``train/evaluate.py``).
"""

from __future__ import annotations

import contextlib
import gc
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..config import Config
from ..files import atomic_write_json
from ..models.load import compute_dtype, load_model, resolve_model_path
from .evaluate import loss_sums, mean_loss
from .loss import CausalLMLoss


class NotEnoughMemory(RuntimeError):
    pass


def _eval_loss(model: Any, examples: Sequence[Any], device: torch.device, pad_id: int, batch_size: int,
               dtype: torch.dtype, trained_logits_only: bool = True) -> float:
    """Mean loss over every trained token of ``examples`` (as the recipe's eval computes it)."""
    return mean_loss(loss_sums(CausalLMLoss(model, trained_logits_only), examples, batch_size, pad_id, device, dtype))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _logical_params(model: torch.nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        qs = getattr(p, "quant_state", None)
        n += int(torch.Size(qs.shape).numel()) if qs is not None else p.numel()
    return n


def quantization_cost(cfg: Config, nf4_model: Any, eval_examples: Sequence[Any], device: Optional[torch.device] = None,
                      pad_id: int = 0, batch_size: Optional[int] = None) -> tuple[float, float]:
    """(eval loss of the NF4 base, eval loss of the unquantized base) on ``eval_examples``.

    ``nf4_model`` is the model being trained: a peft model on the NF4 base, or the NF4 base.
    Its adapters are disabled for the measurement (with B = 0 at init the peft model already
    equals the base; disabling makes that exact however far it has trained). The unquantized
    base is loaded temporarily in the compute dtype on the same device, evaluated and freed;
    if the device lacks the memory for it, :class:`NotEnoughMemory` says how much it needs.
    """
    if not eval_examples:
        raise ValueError("quantization_cost needs eval examples")
    device = torch.device(device) if device is not None else next(nf4_model.parameters()).device
    dtype = compute_dtype(cfg.model.dtype, device)
    bs = batch_size or cfg.train.eval_batch_size or cfg.train.batch_size
    tlo = cfg.train.trained_logits_only

    disable = getattr(nf4_model, "disable_adapter", None)
    with (disable() if callable(disable) else contextlib.nullcontext()):
        loss_nf4 = _eval_loss(nf4_model, eval_examples, device, pad_id, bs, dtype, tlo)

    need = _logical_params(nf4_model) * torch.tensor([], dtype=dtype).element_size()
    free = _free_bytes(device)
    if need * 1.2 > free:
        raise NotEnoughMemory(f"the unquantized base needs ~{need / 2**20:.0f} MiB on {device}, {free / 2**20:.0f} MiB are free")
    path = resolve_model_path(cfg.model.name)
    full = load_model(path, dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation).to(device)
    try:
        loss_full = _eval_loss(full, eval_examples, device, pad_id, bs, dtype, tlo)
    finally:
        del full
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return loss_nf4, loss_full


def report_quantization_cost(cfg: Config, model: Any, eval_examples: Sequence[Any], device: torch.device, pad_id: int,
                             info: Callable[[str], None], warn: Callable[[str], None], run_dir: Optional[Path] = None) -> Optional[tuple[float, float]]:
    """Print the base's eval loss in NF4 and unquantized, with the delta (start of a QLoRA run)."""
    try:
        loss_nf4, loss_full = quantization_cost(cfg, model, eval_examples, device, pad_id)
    except NotEnoughMemory as e:
        warn(f"quantization cost not measured: {e}")
        return None
    delta = loss_nf4 - loss_full
    info(f"quantization cost (base model, eval set, {len(eval_examples)} examples): eval loss NF4 {loss_nf4:.4f} vs "
         f"unquantized {loss_full:.4f}: delta {delta:+.4f} ({100 * delta / max(abs(loss_full), 1e-12):+.2f}%, "
         f"perplexity x{math.exp(min(delta, 50)):.3f})")
    if run_dir is not None:
        atomic_write_json(Path(run_dir) / "quantization_cost.json",
                          {"eval_loss_nf4": loss_nf4, "eval_loss_unquantized": loss_full, "delta": delta, "eval_examples": len(eval_examples)})
    return loss_nf4, loss_full
