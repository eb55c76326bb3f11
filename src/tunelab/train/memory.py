"""Parameters by kind with their bytes: what the model costs in memory before it trains."""

from __future__ import annotations

from typing import Any

import torch


def _param_bytes(p: torch.Tensor) -> int:
    # bitsandbytes Params4bit stores packed uint8 (2 weights a byte) plus its quant state.
    n = p.numel() * p.element_size()
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        for t in (getattr(qs, "absmax", None), getattr(getattr(qs, "state2", None), "absmax", None), getattr(getattr(qs, "state2", None), "code", None), getattr(qs, "code", None)):
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
    return n


def _logical_numel(p: torch.Tensor) -> int:
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return p.numel()


def param_breakdown(model: Any) -> dict[str, dict[str, int]]:
    """{kind: {"params": n, "bytes": b}} for trainable, frozen quantized, frozen full precision."""
    out = {k: {"params": 0, "bytes": 0} for k in ("trainable", "frozen quantized", "frozen full precision")}
    seen = set()
    for _, p in model.named_parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        if p.requires_grad:
            kind = "trainable"
        elif getattr(p, "quant_state", None) is not None or p.dtype in (torch.uint8, torch.int8):
            kind = "frozen quantized"
        else:
            kind = "frozen full precision"
        out[kind]["params"] += _logical_numel(p)
        out[kind]["bytes"] += _param_bytes(p)
    return out


def memory_report(model: Any) -> tuple[list[tuple], tuple[str, ...]]:
    """Rows and headers for the start-of-run parameter table."""
    from .reporting import format_bytes

    b = param_breakdown(model)
    total = sum(v["params"] for v in b.values())
    rows = [(k, f"{v['params']:,}", f"{100 * v['params'] / max(total, 1):.2f}%", format_bytes(v["bytes"])) for k, v in b.items() if v["params"]]
    rows.append(("total", f"{total:,}", "100%", format_bytes(sum(v["bytes"] for v in b.values()))))
    return rows, ("kind", "params", "share", "bytes")
