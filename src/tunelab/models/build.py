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

    return nf4_config(dtype)


def build_model(cfg: Config, device: torch.device) -> BuiltModel:
    path = resolve_model_path(cfg.model.name)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    dtype = compute_dtype(cfg.model.dtype, device)
    # Frozen base in the compute dtype; full fine-tuning trains every weight, so it keeps fp32
    # master weights and runs the forward under autocast.
    base_dtype = torch.float32 if cfg.method == "full" else dtype
    model = load_model(path, base_dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation, quantization_config(cfg, dtype))
    if cfg.method == "qlora":
        from .quantize import prepare_quantized_base

        model = prepare_quantized_base(model, cfg)
    if cfg.method in ("lora", "qlora"):
        model = apply_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if not (cfg.method == "qlora"):
        model.to(device)
    return BuiltModel(model, tok, dtype, path)
