"""``tunelab merge``: base + adapter -> a plain transformers model dir (zero added latency).

The arithmetic is the pure :func:`merge_lora_state_dict`; this module reads the base (for QLoRA:
the NF4 base dequantized, exactly what the adapter was trained on) and writes the result.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..config import Config, load_config
from ..data.render import template_source
from ..files import atomic_dir
from .adapters import merge_lora_state_dict
from .load import compute_dtype, load_base_state_dict, load_model, load_tokenizer, resolve_model_path
from .quantize import QuantizationBackendError, check_backend, nf4_config, place_on, quantized_linears, require_bitsandbytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def adapter_scaling(adapter_dir: Path) -> float:
    ac = json.loads((adapter_dir / "adapter_config.json").read_text())
    if ac.get("use_rslora"):
        return ac["lora_alpha"] / ac["r"] ** 0.5
    return ac["lora_alpha"] / ac["r"]


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


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: Optional[str] = None) -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, _ = load_config(run_dir / "config.yaml")
    if cfg.method == "full":
        raise ValueError(f"{run_dir} is a full fine-tune: {run_dir / 'model'} is already a plain model dir")
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors; train the run first")
    if out_dir.resolve() in (run_dir.resolve(), adapter_dir.resolve()):
        raise ValueError("--out must be a new folder, not the run itself")
    base_dir = resolve_model_path(cfg.model.name)
    if cfg.method == "qlora":
        base = dequantized_base_state_dict(cfg, base_dir)  # what the adapter was trained on
    else:
        base = load_base_state_dict(base_dir)
    out_dtype = DTYPES[dtype] if dtype else None
    merged = merge_lora_state_dict(base, load_file(str(adapter_dir / "adapter_model.safetensors")), adapter_scaling(adapter_dir), out_dtype)
    if out_dtype is not None:
        merged = {k: (v.to(out_dtype) if v.is_floating_point() else v) for k, v in merged.items()}
    tok = load_tokenizer(base_dir)
    if cfg.template != "auto":
        tok.chat_template = template_source(cfg.template)  # ship the template the model was trained with

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        conf = json.loads((Path(base_dir) / "config.json").read_text())
        conf.pop("quantization_config", None)
        some = next(v for v in merged.values() if v.is_floating_point())
        conf["dtype"] = str(some.dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(conf, indent=2))
        gen = Path(base_dir) / "generation_config.json"
        if gen.exists():
            shutil.copy(gen, tmp / "generation_config.json")
        tok.save_pretrained(tmp)

    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out")
    return atomic_dir(out_dir, write)
