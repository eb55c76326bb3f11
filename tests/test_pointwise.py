"""The fused decoder's pointwise steps compiled by torch.compile compute what the eager ones do,
for any token count (dynamic shapes), and fall back to eager when compiling fails."""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels import pointwise
from tunelab.kernels.pointwise import EAGER, pointwise_ops

pytestmark = pytest.mark.slow  # the first compile on a machine takes ~40 s (inductor + gcc)


def _inputs(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return {"x": r(n, 48), "dxr": r(n, 48), "dres": r(n, 48), "rstd": torch.rand(n, 1, generator=g) + 0.5,
            "g": r(n, 80), "u": r(n, 80), "dh": r(n, 80)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_steps_equal_eager(dtype):
    ops = pointwise_ops(True)
    assert ops.compiled and pointwise_ops(True) is ops and pointwise_ops(False) is EAGER
    # fp32: reassociated sums only; bf16: the same fp32 math, at most one bf16 rounding apart
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    for n in (37, 5, 129):  # several token counts through one compiled graph
        t = _inputs(n, dtype, seed=n)
        for got, want in ((ops.rms(t["x"], 1e-5), EAGER.rms(t["x"], 1e-5)),
                          ((ops.rms_backward(t["dxr"], t["x"], t["rstd"], t["dres"]),),
                           (EAGER.rms_backward(t["dxr"].clone(), t["x"], t["rstd"], t["dres"]),)),
                          ((ops.swiglu(t["g"], t["u"]),), (EAGER.swiglu(t["g"], t["u"]),)),
                          (ops.swiglu_backward(t["dh"], t["g"], t["u"]), EAGER.swiglu_backward(t["dh"].clone(), t["g"], t["u"]))):
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a, b, **tol)


def test_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    step = pointwise._Compiled(pointwise.rms_eager, pointwise.rms_eager)
    x = torch.randn(6, 16)
    with pytest.warns(RuntimeWarning, match=r"torch.compile of rms_eager failed \(RuntimeError: no C\+\+ compiler found\); running it eagerly"):
        got = step(x, 1e-6)
    want = pointwise.rms_eager(x, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither retries nor warns
        step(x, 1e-6)
