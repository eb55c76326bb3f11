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

The training recipe is the LoRA recipe; this module only supplies the quantization config and
prepares the loaded base. What quantization costs in eval loss is measured by
``train/quantization_cost.py``; ``models/merge.py`` rebuilds the dequantized base.
"""

from __future__ import annotations

from typing import Any, Optional

import torch



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


def keep_standard_layout(linear: Any) -> None:
    """Keep a bitsandbytes ``Linear4bit`` on its standard dequantize-then-matmul path.

    With AVX512-BF16, bitsandbytes (0.45+, ``Linear4bit.support_avx512bf16_for_cpu``) repacks
    the weights on the first eval-mode call and then runs a fused kernel that casts the input
    to bf16 whatever ``bnb_4bit_compute_dtype`` says, and that has no backward. Disabling it
    keeps the compute dtype the config chose and the layout training used.
    """
    if hasattr(linear, "support_avx512bf16_for_cpu"):
        linear.support_avx512bf16_for_cpu = False


def honour_compute_dtype(model: Any, dtype: torch.dtype) -> Any:
    """For inference: allow bitsandbytes' bf16 CPU kernel only when the compute dtype is bf16.

    Otherwise an fp32 QLoRA run would silently generate with bf16 matmuls on AVX512-BF16
    machines and differ from the same run elsewhere (and from its merged model) by bf16
    rounding rather than summation order."""
    if dtype != torch.bfloat16:
        for _, m in quantized_linears(model):
            keep_standard_layout(m)
    return model


def prepare_quantized_base(model: Any, device: Optional[torch.device] = None) -> Any:
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
        keep_standard_layout(m)
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None:
        place_on(model, device)
    return model
