"""``tunelab merge``: base + adapter -> a plain transformers model dir (zero added latency).

The arithmetic is the pure :func:`merge_lora_state_dict`; this module only reads and writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..config import load_config
from ..data.render import BUILTIN_TEMPLATES
from ..train.checkpoint import atomic_dir
from .adapters import merge_lora_state_dict
from .load import load_tokenizer, resolve_model_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_base_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights to merge into")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def adapter_scaling(adapter_dir: Path) -> float:
    ac = json.loads((adapter_dir / "adapter_config.json").read_text())
    if ac.get("use_rslora"):
        return ac["lora_alpha"] / ac["r"] ** 0.5
    return ac["lora_alpha"] / ac["r"]


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
        from .quantize import dequantized_base_state_dict

        base = dequantized_base_state_dict(cfg, base_dir)  # what the adapter was trained on
    else:
        base = load_base_state_dict(base_dir)
    out_dtype = DTYPES[dtype] if dtype else None
    merged = merge_lora_state_dict(base, load_file(str(adapter_dir / "adapter_model.safetensors")), adapter_scaling(adapter_dir), out_dtype)
    if out_dtype is not None:
        merged = {k: (v.to(out_dtype) if v.is_floating_point() else v) for k, v in merged.items()}
    tok = load_tokenizer(base_dir)
    if cfg.template in BUILTIN_TEMPLATES:
        tok.chat_template = BUILTIN_TEMPLATES[cfg.template]  # ship the template the model was trained with

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
