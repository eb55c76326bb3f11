"""Parameters by kind with their bytes: what the model costs in memory before it trains.

A bitsandbytes 4-bit weight (``Params4bit``) is a packed uint8 tensor holding two 4-bit codes
a byte, plus its quant state: the per-block absmax (fp32, or uint8 codes with double
quantization, whose nested state adds an fp32 absmax per 256 blocks, a 256-entry fp32 code
book and an fp32 offset) and the 16-entry code book. NF4 with block 64 and double quant:
0.5 + 1/64 + 4/(64*256) bytes per weight plus ~1.1 KB of code books per layer ~= 0.516.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def _quant_state_tensors(qs: Any) -> list[torch.Tensor]:
    """Every tensor a bitsandbytes QuantState holds (nested state included)."""
    out = []
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, name, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    state2 = getattr(qs, "state2", None) if getattr(qs, "nested", False) else None
    if state2 is not None:
        out.extend(_quant_state_tensors(state2))
    return out


def _tensor_key(t: torch.Tensor) -> tuple:
    # Storage identity: the same tensor (or a view) shared by several quant states counts once.
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def _param_bytes(p: torch.Tensor, seen: Optional[set] = None) -> int:
    """Bytes ``p`` occupies: its own storage plus, for a quantized weight, its quant state.

    ``seen`` (storage keys already counted) makes tensors shared between parameters count once."""
    seen = set() if seen is None else seen
    n = 0
    tensors = [p] + _quant_state_tensors(getattr(p, "quant_state", None)) if getattr(p, "quant_state", None) is not None else [p]
    for t in tensors:
        k = _tensor_key(t)
        if k in seen and t.numel() > 0:
            continue
        seen.add(k)
        n += t.numel() * t.element_size()
    return n


def _logical_numel(p: torch.Tensor) -> int:
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return p.numel()


def _is_quantized(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None or p.dtype in (torch.uint8, torch.int8)


KINDS = ("trainable", "frozen quantized", "frozen full precision")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64", torch.int8: "int8"}


def _kind(p: torch.Tensor) -> str:
    if p.requires_grad:
        return "trainable"
    return "frozen quantized" if _is_quantized(p) else "frozen full precision"


def _precision(p: torch.Tensor) -> str:
    """The storage precision of ``p`` as a reader would name it: fp32, bf16, NF4 4-bit, int8."""
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        qt = str(getattr(qs, "quant_type", "4bit")).upper()
        return f"{qt} 4-bit" if p.dtype == torch.uint8 else qt
    return DTYPE_NAMES.get(p.dtype, str(p.dtype).replace("torch.", ""))


def _tally(model: Any, key: Any) -> dict[str, dict[str, int]]:
    """{key(p): {"params": n, "bytes": b}}; logical weights (a 4-bit (out, in) weight counts
    out*in, not its packed bytes); tied weights count once."""
    out: dict[str, dict[str, int]] = {}
    seen_params: set = set()
    seen_storage: set = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen_params:  # tied weights count once
            continue
        seen_params.add(id(p))
        row = out.setdefault(key(p), {"params": 0, "bytes": 0})
        row["params"] += _logical_numel(p)
        row["bytes"] += _param_bytes(p, seen_storage)
    return out


def param_breakdown(model: Any) -> dict[str, dict[str, int]]:
    """{kind: {"params": n, "bytes": b}} for trainable, frozen quantized, frozen full precision."""
    t = _tally(model, _kind)
    return {k: t.get(k, {"params": 0, "bytes": 0}) for k in KINDS}


def memory_report(model: Any) -> tuple[list[tuple], tuple[str, ...]]:
    """Rows and headers for the start-of-run parameter table, one row per (kind, precision):
    ``trainable fp32``, ``frozen bf16``, ``frozen NF4 4-bit``."""
    from .reporting import format_bytes

    b = _tally(model, lambda p: (KINDS.index(_kind(p)), "trainable" if p.requires_grad else "frozen", _precision(p)))
    total = sum(v["params"] for v in b.values())
    total_bytes = sum(v["bytes"] for v in b.values())

    def per(v: dict) -> str:
        return f"{v['bytes'] / v['params']:.3f}" if v["params"] else "-"

    rows = [(f"{k[1]} {k[2]}", f"{v['params']:,}", f"{100 * v['params'] / max(total, 1):.2f}%", format_bytes(v["bytes"]), per(v))
            for k, v in sorted(b.items()) if v["params"]]
    rows.append(("total", f"{total:,}", "100%", format_bytes(total_bytes), per({"params": total, "bytes": total_bytes})))
    return rows, ("parameters", "count", "share", "bytes", "bytes/param")
