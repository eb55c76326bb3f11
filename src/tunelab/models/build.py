"""Build the model to train: load the base with the dtype policy, then add adapters.

QLoRA is LoRA with a quantized base: the only difference is the quantization config the base
is loaded with (litgpt's view), so the recipe has one path for lora, qlora and full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config
from .adapters import apply_lora
from .load import compute_dtype, load_model, load_tokenizer, resolve_model_path


@dataclass
class BuiltModel:
    model: Any  # peft model (lora/qlora) or the transformers model (full)
    tokenizer: Any
    compute_dtype: torch.dtype  # autocast dtype of the forward pass
    base_path: str


def quantization_config(cfg: Config, dtype: torch.dtype) -> Any:
    if cfg.method != "qlora":
        return None
    from .quantize import nf4_config

    return nf4_config(dtype)  # NF4, block 64, double quant, compute in ``dtype``


def build_model(cfg: Config, device: torch.device) -> BuiltModel:
    path = resolve_model_path(cfg.model.name)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    dtype = compute_dtype(cfg.model.dtype, device)
    if cfg.method == "qlora":
        from ..console import allow_logger
        from .quantize import check_backend

        allow_logger("bitsandbytes")  # its messages matter in a QLoRA run (quiet otherwise)

        check_backend(device)  # a missing or unsupported bitsandbytes fails here, saying how to fix it
    # Frozen base in the compute dtype; full fine-tuning trains every weight, so it keeps fp32
    # master weights and runs the forward under autocast.
    base_dtype = torch.float32 if cfg.method == "full" else dtype
    model = load_model(path, base_dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation, quantization_config(cfg, dtype),
                       allow_pickle=cfg.model.allow_pickle)
    if cfg.method == "qlora":
        from .quantize import prepare_quantized_base

        # transformers loads a bitsandbytes model straight onto the current CUDA device (or the
        # CPU), quantizing as it goes; prepare_quantized_base moves it only if ``device`` differs
        # (DDP ranks), before the adapters are created next to their base layers.
        model = prepare_quantized_base(model, device)
    if cfg.method in ("lora", "qlora"):
        model = apply_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if cfg.method != "qlora":
        model.to(device)  # qlora: already placed (moving Params4bit again would rebuild every weight)
    return BuiltModel(model, tok, dtype, path)
