"""The fused decoder's pointwise steps (RMSNorm forward / backward, SwiGLU forward / backward),
eager or compiled by ``torch.compile`` (inductor's CPU backend, gcc).

Eager PyTorch makes one pass over memory per op: RMSNorm's backward on a bf16 (N, 576) block is
~10 passes (casts to fp32, products, sums), so it is memory-bound at ~3 ms for N = 1273, while
inductor fuses it into one loop: 0.45 ms, measured on a 2-core Intel Xeon with AMX. Over a
whole fused-decoder forward + backward that buys little: 1.01x and 1.02x on a quiet machine
(1.08x and 1.26x in a noisy hour; ``benchmarks/pointwise_compile.py``, medians of 8 paired
rounds), as matmuls and attention dominate. Compiling costs ~5 s
per process with a warm inductor cache (/tmp/torchinductor_$USER, or TORCHINDUCTOR_CACHE_DIR)
and ~40 s the first time on a machine, so it is opt-in
(``train.compile_pointwise``), for long runs only.

:func:`pointwise_ops` returns a namespace with the same four functions either way; the compiled
one falls back to eager (one warning) if compilation fails, e.g. without a C++ compiler.
Shapes: ``x`` (N, H); ``rstd`` (N, 1) fp32; ``g``, ``u``, ``dh`` (N, I). Imports nothing of tunelab.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- eager (in place where it saves a pass)

def rms_eager(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * rstd, rstd) with the statistics in fp32, like LlamaRMSNorm (before its weight)."""
    xf = x.float()
    rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).pow_(2).div_(x.shape[-1]).add_(eps).rsqrt_()
    return (xf * rstd).to(x.dtype), rstd


def rms_backward_eager(dxr: torch.Tensor, xr: torch.Tensor, rstd: torch.Tensor, dres: torch.Tensor) -> torch.Tensor:
    """dres + d(x * rstd)/dx applied to dxr (in fp32): rstd * (dxr - xr * mean(dxr * xr))."""
    d, r = dxr.float(), xr.float()
    c = torch.linalg.vecdot(d, r).unsqueeze(-1).div_(d.shape[-1])
    d.addcmul_(r, c, value=-1.0)
    return torch.addcmul(dres.float(), d, rstd).to(dres.dtype)


def swiglu_eager(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u."""
    return F.silu(g).mul_(u)


def swiglu_backward_eager(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dg, d/du) of silu(g) * u for the output gradient ``dh`` (which may be overwritten)."""
    du = dh * F.silu(g)
    dg = torch.ops.aten.silu_backward(dh.mul_(u), g)
    return dg, du


# --------------------------------------------------------------------------- backward steps written for inductor
# The eager backward steps write into their inputs (dh; dxr when fp32) to save a pass; a mutated
# input costs the compiled graph a copy back, so these two are written without in-place ops. The forward steps
# mutate only their own temporaries and are compiled as they are.

def _rms_backward(dxr: torch.Tensor, xr: torch.Tensor, rstd: torch.Tensor, dres: torch.Tensor) -> torch.Tensor:
    d, r = dxr.float(), xr.float()
    c = (d * r).sum(-1, keepdim=True) / d.shape[-1]
    return (dres.float() + (d - r * c) * rstd).to(dres.dtype)


def _swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # silu'(g) = s (1 + g (1 - s)), s = sigmoid(g), in fp32 as aten's silu_backward computes it
    gf = g.float()
    s = torch.sigmoid(gf)
    du = dh * F.silu(g)
    dg = (dh.float() * u.float() * s * (1 + gf * (1 - s))).to(dh.dtype)
    return dg, du


class _Compiled:
    """One function compiled on first call (dynamic shapes: no recompile per token count); eager
    from then on if compilation fails."""

    def __init__(self, fn: Callable, eager: Callable):
        self.fn, self.eager, self.compiled = fn, eager, None

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        if self.compiled is not self.eager:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - inductor raises many kinds (no compiler, codegen bugs)
                warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "running it eagerly", RuntimeWarning, stacklevel=2)
                self.compiled = self.eager
        return self.eager(*args)


class PointwiseOps:
    """The four pointwise steps of a decoder layer."""

    def __init__(self, rms, rms_backward, swiglu, swiglu_backward, compiled: bool):
        self.rms, self.rms_backward, self.swiglu, self.swiglu_backward = rms, rms_backward, swiglu, swiglu_backward
        self.compiled = compiled


EAGER = PointwiseOps(rms_eager, rms_backward_eager, swiglu_eager, swiglu_backward_eager, compiled=False)
_COMPILED: PointwiseOps | None = None


def pointwise_ops(compiled: bool) -> PointwiseOps:
    """The eager steps, or the process-wide compiled ones (compiled lazily, on first use)."""
    global _COMPILED
    if not compiled:
        return EAGER
    if _COMPILED is None:
        _COMPILED = PointwiseOps(_Compiled(rms_eager, rms_eager), _Compiled(_rms_backward, rms_backward_eager),
                                 _Compiled(swiglu_eager, swiglu_eager), _Compiled(_swiglu_backward, swiglu_backward_eager), compiled=True)
    return _COMPILED
