"""QLoRA's quantized base: NF4 linear weights (block size 64) with double-quantized scales.

QLoRA (Dettmers et al. 2023) is LoRA on a frozen base whose linear weights are stored as
4-bit NormalFloat codes: each block of 64 consecutive weights keeps one scale (its absmax) and
16 levels spaced for normally distributed weights. Double quantization stores the absmaxes
themselves as 8-bit codes (blocks of 256 absmaxes, one fp32 scale each, around their mean).
Weight memory per quantized parameter: 4 bits + 8/64 bits + 32/(64*256) bits ~= 0.516 bytes.

Everything here is bitsandbytes through transformers' ``BitsAndBytesConfig``:

* embeddings, lm_head (tied or not) and norms stay unquantized, in the compute dtype;
* matmuls run in the compute dtype: bf16 where the hardware runs it fast, else fp32
  (``load.compute_dtype``); weights are dequantized block by block on the fly;
* the LoRA A and B matrices are fp32 (``adapters.apply_lora``);
* nothing is upcast to fp32 and gradient checkpointing stays off unless asked
  (unlike ``peft.prepare_model_for_kbit_training``, which does both).

The training recipe is the LoRA recipe; this module only supplies the quantization config,
prepares the loaded base, measures what quantization costs in eval loss, and rebuilds the
dequantized base for ``tunelab merge``.
"""

from __future__ import annotations

import contextlib
import gc
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..config import Config
from .load import compute_dtype, load_model, resolve_model_path


NF4_BLOCKSIZE = 64  # bitsandbytes' default for 4-bit (Params4bit / quantize_4bit); checked on load
NESTED_BLOCKSIZE = 256  # double quantization: absmaxes quantized to 8 bits in blocks of 256
INSTALL_HINT = "pip install bitsandbytes  (or: pip install 'tunelab[qlora]')"


class QuantizationBackendError(RuntimeError):
    """bitsandbytes is missing or cannot run NF4 on this device; the message says what to do."""


def require_bitsandbytes() -> Any:
    """Import bitsandbytes or raise an error saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizationBackendError(
            f"method: qlora quantizes the base to NF4 with bitsandbytes, which is not importable ({e}). "
            f"Install it with: {INSTALL_HINT}"
        ) from None
    return bitsandbytes


def check_backend(device: torch.device) -> None:
    """Fail early, with the fix, when bitsandbytes has no NF4 kernels for ``device``.

    Quantizes and dequantizes one block on the device: the cheapest complete check."""
    bnb = require_bitsandbytes()
    try:
        x = torch.linspace(-1, 1, NF4_BLOCKSIZE, device=device)
        q, st = bnb.functional.quantize_4bit(x, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        bnb.functional.dequantize_4bit(q, st, quant_type="nf4")
    except Exception as e:  # noqa: BLE001 - any failure here means "no usable backend"
        raise QuantizationBackendError(
            f"method: qlora: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run NF4 on {device} ({type(e).__name__}: {e}). "
            f"bitsandbytes >= 0.45 runs NF4 on CUDA and on x86 CPUs; upgrade with: pip install -U bitsandbytes, "
            "or use method: lora."
        ) from None


def nf4_config(dtype: torch.dtype) -> Any:
    """The ``quantization_config`` for ``from_pretrained``: NF4, double quant, ``dtype`` compute.

    Block size is not a BitsAndBytesConfig option: transformers uses bitsandbytes' 4-bit
    default, 64 (``prepare_quantized_base`` checks it). Storage is uint8 (two codes a byte);
    FSDP users would set ``bnb_4bit_quant_storage`` to the compute dtype instead.
    ``llm_int8_skip_modules`` stays None so transformers keeps lm_head / tied output
    embeddings unquantized (embeddings and norms are not Linear layers and never are).
    """
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def quantized_linears(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """(name, module) of every bitsandbytes 4-bit linear layer in ``model``."""
    bnb = require_bitsandbytes()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    cur = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
    return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)


def place_on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a (quantized) model to ``device`` only if it is not already there.

    transformers puts a bitsandbytes model on the current CUDA device (or the CPU) while
    loading, which is where it should be in a single-process run; under DDP or with an
    explicit device it may not be. Params4bit.to moves the packed data and its quant state."""
    if any(not _same_device(p.device, device) for p in model.parameters()):
        model.to(device)
    return model


def prepare_quantized_base(model: Any, cfg: Config, device: Optional[torch.device] = None) -> Any:
    """Freeze the NF4 base and check that it is what method: qlora promises.

    Deliberately not ``peft.prepare_model_for_kbit_training``: that upcasts every bf16/fp16
    parameter (the 28M-parameter embedding of SmolLM2 included) to fp32 and turns gradient
    checkpointing on by default. Here the frozen unquantized weights stay in the compute
    dtype, and gradient checkpointing follows ``train.gradient_checkpointing`` (build.py).
    """
    linears = quantized_linears(model)
    if not linears:
        raise QuantizationBackendError(
            "method: qlora: the model loaded without any 4-bit linear layer; transformers did not apply "
            f"the NF4 config (is the bitsandbytes integration available? {INSTALL_HINT})"
        )
    for name, m in linears:
        qs = m.weight.quant_state
        if qs is None or qs.quant_type != "nf4" or qs.blocksize != NF4_BLOCKSIZE or not qs.nested:
            got = None if qs is None else f"{qs.quant_type}, block {qs.blocksize}, double quant {qs.nested}"
            raise QuantizationBackendError(f"method: qlora: {name} is not NF4 / block {NF4_BLOCKSIZE} / double quant (got {got})")
        # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weights for fast inference
        # the first time it runs in eval mode without grad (e.g. the step-0 eval) and then uses
        # a kernel without a backward: gradients would stop flowing through the base to the
        # adapters below. Training keeps the standard layout.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None:
        place_on(model, device)
    return model


# --------------------------------------------------------------------------- quality cost

class NotEnoughMemory(RuntimeError):
    pass


def _eval_loss(model: Any, examples: Sequence[Any], device: torch.device, pad_id: int, batch_size: int,
               dtype: torch.dtype, trained_logits_only: bool = True) -> float:
    """Mean loss over every trained token of ``examples`` (as the recipe's eval computes it)."""
    from ..data.batching import collate
    from ..train.loss import CausalLMLoss

    loss_fn = CausalLMLoss(model, trained_logits_only)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, n_tok = 0.0, 0
    was_training = model.training
    model.eval()  # no LoRA dropout
    try:
        with torch.no_grad(), (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()):
            for s in range(0, len(order), batch_size):
                b = collate([examples[i] for i in order[s:s + batch_size]], pad_id).to(device)
                loss_sum, n = loss_fn(b.input_ids, b.attention_mask, b.labels)
                total += float(loss_sum)
                n_tok += int(n)
    finally:
        model.train(was_training)
    return total / max(n_tok, 1)


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
    import json

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
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "quantization_cost.json").write_text(json.dumps(
            {"eval_loss_nf4": loss_nf4, "eval_loss_unquantized": loss_full, "delta": delta, "eval_examples": len(eval_examples)}, indent=1) + "\n")
    return loss_nf4, loss_full


# --------------------------------------------------------------------------- merge

def dequantize_nf4(weight: Any) -> torch.Tensor:
    """The dense (out, in) weight a bitsandbytes Params4bit stands for, in its original dtype."""
    bnb = require_bitsandbytes()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state, quant_type=weight.quant_state.quant_type)


def dequantized_base_state_dict(cfg: Config, base_dir: str, device: Optional[torch.device] = None,
                                dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The base a QLoRA adapter was trained on, as plain transformers weights (on the CPU).

    The base is loaded exactly as training loads it (same NF4 config, same compute dtype, so
    the same layers quantized from the same input), each 4-bit layer is dequantized, and the
    result replaces that layer's weight in the checkpoint's state dict. Everything else
    (embeddings, norms, biases, an untied lm_head) is the checkpoint's tensor, untouched.
    Dequantized weights take the checkpoint's dtype (bf16 or fp32).
    """
    from .merge import load_base_state_dict

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_backend(device)
    dtype = dtype or compute_dtype(cfg.model.dtype, device)
    sd = load_base_state_dict(base_dir)
    model = load_model(base_dir, dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation, nf4_config(dtype))
    try:
        place_on(model, device)
        linears = quantized_linears(model)
        if not linears:
            raise QuantizationBackendError(f"{base_dir}: no layer was quantized to NF4; cannot rebuild the QLoRA base")
        for name, m in linears:
            key = f"{name}.weight"
            if key not in sd:
                raise KeyError(f"{base_dir}: quantized layer {name!r} has no checkpoint weight {key!r} (renamed keys?)")
            w = dequantize_nf4(m.weight)
            if tuple(w.shape) != tuple(sd[key].shape):
                raise ValueError(f"{key}: dequantized shape {tuple(w.shape)} != checkpoint shape {tuple(sd[key].shape)}")
            sd[key] = w.to(device="cpu", dtype=sd[key].dtype)
    finally:
        del model
        gc.collect()
    return sd
