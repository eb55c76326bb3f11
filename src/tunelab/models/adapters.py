"""LoRA adapters through peft, and merging as a pure function.

LoRA (Hu et al. 2021): W' = W + (alpha / r) * B @ A with A: (r, in), B: (out, r), B = 0 at
init so the adapted model starts exactly at the base model. Only A and B train.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Optional

import torch

from ..config import Config

TARGET_PRESETS = {
    # start with q_proj + v_proj; expand to more modules if accuracy is insufficient (docs/practices.md#lora-targets)
    "qv": ["q_proj", "v_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",
}


def num_layers(model: Any) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise ValueError("cannot tell the model's number of layers (config.num_hidden_layers)")
    return int(n)


def resolve_layers(spec: str | list[int], n_layers: int) -> Optional[list[int]]:
    """lora.layers -> layer indices for peft (None = all). top:N = the N closest to the output
    (higher layers are more task-specific: docs/practices.md#lora-layers)."""
    if spec == "all":
        return None
    if isinstance(spec, str):
        n = int(spec.split(":", 1)[1])
        if n > n_layers:
            raise ValueError(f"lora.layers: top:{n} but the model has {n_layers} layers")
        return list(range(n_layers - n, n_layers))
    bad = [i for i in spec if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"lora.layers: indices {bad} out of range for a model with {n_layers} layers")
    return sorted({i % n_layers for i in spec})


def resolve_targets(spec: str | list[str], model: Any) -> str | list[str]:
    targets = TARGET_PRESETS[spec] if isinstance(spec, str) else list(spec)
    if isinstance(targets, list):
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"lora.targets: {missing} not found in the model; its linear modules are {linear}")
    return targets


def linear_module_names(model: Any) -> list[str]:
    """What peft's ``all-linear`` selects, as names: every linear layer but the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return sorted({
        name.rsplit(".", 1)[-1] for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head and name.rsplit(".", 1)[-1] != "lm_head"
    })


def peft_lora_config(cfg: Config, model: Any) -> Any:
    from peft import LoraConfig, TaskType

    if cfg.lora.rank > 128:
        warnings.warn(
            f"lora.rank={cfg.lora.rank} > 128: that defeats LoRA's parameter efficiency (docs/practices.md#lora-rank); "
            "4-64 is typical unless you have a reason.",
            stacklevel=2,
        )
    layers = resolve_layers(cfg.lora.layers, num_layers(model))
    targets = resolve_targets(cfg.lora.targets, model)
    kw: dict[str, Any] = {}
    if layers is not None:
        kw.update(layers_to_transform=layers, layers_pattern="layers")
        if targets == "all-linear":
            # peft refuses layers_to_transform with a string target: name the modules instead
            targets = linear_module_names(model)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias="none",
        **kw,
    )


def apply_lora(model: Any, cfg: Config) -> Any:
    """Wrap ``model`` with LoRA adapters; adapter weights in fp32 whatever the base dtype."""
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, peft_lora_config(cfg, model), autocast_adapter_dtype=True)
    for name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable parameters are always fp32 (master weights)
    return peft_model


# --------------------------------------------------------------------------- merging

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def merge_lora_state_dict(
    base: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    scaling: float,
    out_dtype: Optional[torch.dtype] = None,
) -> dict[str, torch.Tensor]:
    """Pure function: base weights + LoRA deltas -> merged weights, inputs untouched.

    ``base`` maps plain transformers keys (``model.layers.0.self_attn.q_proj.weight``) to
    tensors; ``adapter`` holds peft-saved keys (``base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.weight``: (r, in); ``...lora_B.weight``: (out, r)). For each adapted module:
    W' = W + scaling * B @ A, computed in fp32 then cast to ``out_dtype`` (default W's dtype).
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.items():
        m = _LORA_KEY.match(key)
        if not m:
            continue
        module = m.group("module")
        for prefix in ("base_model.model.",):
            if module.startswith(prefix):
                module = module[len(prefix):]
        pairs.setdefault(module, {})[m.group("ab")] = t
    merged = dict(base)
    for module, ab in pairs.items():
        wkey = f"{module}.weight"
        if wkey not in base:
            raise KeyError(f"adapter module {module!r} has no base weight {wkey!r}")
        if set(ab) != {"A", "B"}:
            raise KeyError(f"adapter module {module!r} lacks lora_A or lora_B")
        w = base[wkey]
        delta = scaling * (ab["B"].float() @ ab["A"].float())  # (out, r) @ (r, in) -> (out, in)
        merged[wkey] = (w.float() + delta).to(out_dtype or w.dtype)
    return merged
