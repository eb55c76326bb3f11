"""Liger-Kernel (Triton, CUDA only): RMSNorm, RoPE and SwiGLU patched into a transformers model,
and its fused linear cross-entropy (logits never materialised).

A thin wrapper around the ``liger-kernel`` package (Hsu et al. 2024, arXiv:2410.10989): it patches
the model instance through the package's own per-architecture ``apply_liger_kernel_to_*``
functions (``MODEL_TYPE_TO_APPLY_LIGER_FN``), with its fused linear cross-entropy switched off
there, because the loss calls :func:`liger_linear_cross_entropy` itself on the trained rows only.
Imports nothing of tunelab; errors are plain exceptions whose message says what to do.
"""

from __future__ import annotations

from typing import Any

import torch

INSTALL_HINT = "pip install liger-kernel  (or: pip install 'tunelab[liger]')"


def _liger() -> Any:
    try:
        import liger_kernel.transformers as lt
    except ImportError as e:
        raise ImportError(f"train.kernels: liger needs the liger-kernel package, which is not importable ({e}); install it with: {INSTALL_HINT}") from None
    return lt


def apply_liger(model: torch.nn.Module, device: torch.device) -> None:
    """Patch ``model`` (a transformers *ForCausalLM) with Liger's RMSNorm, RoPE and SwiGLU."""
    if torch.device(device).type != "cuda":
        raise RuntimeError(f"train.kernels: liger runs Triton kernels on CUDA only, and this model is on {device}; "
                           "use train.kernels: none here (the fused CPU decoder is the CPU fast path)")
    _liger()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if fn is None:
        raise RuntimeError(f"train.kernels: liger has no kernels for model type {model_type!r}; use train.kernels: none")
    import inspect

    kw = {k: v for k, v in dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False).items()
          if k in inspect.signature(fn).parameters}
    fn(model=model, **kw)


_LOSS: dict[str, Any] = {}


def liger_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies of ``h @ weight.T`` (h: (N, H), weight: (V, H), targets: (N,))."""
    if "sum" not in _LOSS:
        _LOSS["sum"] = _liger().LigerFusedLinearCrossEntropyLoss(reduction="sum")
    out = _LOSS["sum"](weight, h, targets)
    return out[0] if isinstance(out, tuple) else out
