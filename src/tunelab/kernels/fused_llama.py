"""A frozen-base Llama-family decoder with LoRA adapters, forward and backward written out.

``FusedLlama(model).hidden(ids, positions, groups)`` computes the last hidden states (N, H) of
packed rows (examples laid end to end without padding, see :data:`Group`) through every
decoder layer of a transformers Llama / Mistral / Qwen2 model, plain or wrapped by peft, with
the layers' LoRA adapters. Each layer is two autograd functions (:class:`_AttnBlock`,
:class:`_MlpBlock`) with hand-written backward passes:

* attention runs per example (one causal flash-attention call each, PyTorch's CPU kernel), so
  no token attends across examples and no compute goes to padding; a prompt prefix shared by
  the examples of a pass is stored once and attended to by each of them;
* q/k/v are one matmul; RoPE is one complex multiply (q/k rows are permuted to interleaved
  pairs, which attention does not see);
* RMSNorm, SiLU and LoRA dropout take a few passes each; backward keeps ~24 KB per token per
  layer (fp32); ``model.gradient_checkpointing_enable()`` recomputes each layer instead.

It is the same computation as the transformers forward up to fp32 rounding
(tests/test_fast_path.py). :meth:`FusedLlama.check` raises :class:`Unsupported` for anything it
does not compute exactly; callers fall back to the transformers forward. CPU only: on CUDA the
transformers forward with SDPA / flash attention is the fast path. Imports nothing of tunelab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .pointwise import PointwiseOps, pointwise_ops


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class Unsupported(Exception):
    """The fused decoder cannot run this model; the message says why."""


@dataclass
class _Lora:
    A: torch.Tensor  # (r, in), trainable
    B: torch.Tensor  # (out, r), trainable
    scaling: float
    p: float  # dropout probability on the adapter input (0 in eval)


@dataclass
class _Proj:
    weight: torch.Tensor  # frozen (out, in)
    bias: Optional[torch.Tensor]
    lora: Optional[_Lora]


def _proj(module: nn.Module) -> _Proj:
    """A (frozen base, optional LoRA) view of a linear module, plain or peft-wrapped."""
    if type(module) is nn.Linear:
        base, lora = module, None
    else:
        base = getattr(module, "base_layer", None)
        if type(base) is not nn.Linear or not hasattr(module, "lora_A"):
            raise Unsupported(f"{type(module).__name__} is neither nn.Linear nor a peft LoRA Linear")
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            lora = None  # peft then runs the base layer alone, and so do we
        else:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if len(active) > 1:
                raise Unsupported("more than one active LoRA adapter")
            lora = None
            if active:
                name = active[0]
                if getattr(module, "use_dora", {}).get(name) or name in getattr(module, "lora_variant", {}):
                    raise Unsupported("LoRA variants (DoRA, ...)")
                a_lin, b_lin = module.lora_A[name], module.lora_B[name]
                if type(a_lin) is not nn.Linear or type(b_lin) is not nn.Linear or a_lin.bias is not None or b_lin.bias is not None:
                    raise Unsupported("LoRA adapters with biases or non-linear A/B")
                drop = module.lora_dropout[name]
                p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
                if not isinstance(drop, (nn.Dropout, nn.Identity)):
                    raise Unsupported(f"LoRA dropout module {type(drop).__name__}")
                lora = _Lora(a_lin.weight, b_lin.weight, float(module.scaling[name]), p)
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        raise Unsupported("the base weights train (full fine-tuning)")
    if base.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise Unsupported(f"base weight dtype {base.weight.dtype} (quantized?)")
    return _Proj(base.weight, base.bias, lora)


def _mask(shape: tuple[int, int], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Keep-mask with P(drop) = p (to 1/65536) from 16-bit draws: 4 per 64-bit random word, which is
    2-4x cheaper than ``bernoulli_``. Returns (mask, 1 / P(keep))."""
    n = shape[0] * shape[1]
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits
    r = words.view(torch.int16)[:n].view(shape)
    t = int(round(p * 65536))
    return r >= (t - 32768), 65536.0 / (65536 - t)


class _LoraFwd:
    """One adapter's forward pieces kept for backward: mask and A-output (N, r)."""

    __slots__ = ("mask", "inv_keep", "a")

    def __init__(self, mask, inv_keep, a):
        self.mask, self.inv_keep, self.a = mask, inv_keep, a


_NONE = torch.empty(0)


def _save(ctx, tensors: list[torch.Tensor], lora_st: dict[str, _LoraFwd]) -> None:
    """save_for_backward ``tensors`` and the adapters' masks / A-outputs (so that activation
    checkpointing, which hooks save_for_backward, frees and recomputes them too)."""
    ctx.lora_names = list(lora_st)
    ctx.inv_keep = [st.inv_keep for st in lora_st.values()]
    extra = [t for st in lora_st.values() for t in ((st.mask if st.mask is not None else _NONE), st.a)]
    ctx.n_main = len(tensors)
    ctx.save_for_backward(*tensors, *extra)


def _load(ctx) -> tuple[tuple[torch.Tensor, ...], dict[str, _LoraFwd]]:
    saved = ctx.saved_tensors
    main, extra = saved[:ctx.n_main], saved[ctx.n_main:]
    st = {}
    for i, name in enumerate(ctx.lora_names):
        mask, a = extra[2 * i], extra[2 * i + 1]
        st[name] = _LoraFwd(mask if mask.numel() else None, ctx.inv_keep[i], a)
    return main, st


def _as_adapter_dtype(x: torch.Tensor, projs: tuple[_Proj, ...]) -> torch.Tensor:
    """``x`` cast once to the adapters' dtype (fp32 LoRA on a bf16 base) for all of ``projs``
    that share it as input (q/k/v, gate/up): one (N, H) cast instead of one per adapter."""
    dt = next((p.lora.A.dtype for p in projs if p.lora is not None), x.dtype)
    return x.to(dt)


def _lora_forward(x: torch.Tensor, lo: _Lora, out: torch.Tensor, row_perm: Optional[torch.Tensor] = None) -> _LoraFwd:
    """out += scaling * dropout(x) @ A^T @ B^T (B's rows permuted like the base rows when asked).
    ``x`` may already be in the adapter's dtype (then no copy is made)."""
    mask, inv_keep = None, 1.0
    xin = x.to(lo.A.dtype)
    if lo.p > 0:
        mask, inv_keep = _mask(tuple(x.shape), lo.p, x.device)
        xin = torch.where(mask, xin, 0.0)
    a = xin @ (lo.A * inv_keep).t() if inv_keep != 1.0 else xin @ lo.A.t()
    B = lo.B if row_perm is None else lo.B.index_select(0, row_perm)
    delta = (a @ B.t()).mul_(lo.scaling)
    out.add_(delta.to(out.dtype))
    return _LoraFwd(mask, inv_keep, a)


def _lora_backward(x: torch.Tensor, lo: _Lora, st: _LoraFwd, dout: torch.Tensor, dx: Optional[torch.Tensor],
                   row_perm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of A and B (returned) and, when ``dx`` is given, dx += d(adapter)/dx.
    ``dout`` is in the permuted row order of the forward when ``row_perm`` is given."""
    g = dout.to(lo.A.dtype)
    B = lo.B if row_perm is None else lo.B.index_select(0, row_perm)  # as in forward
    dB = (g.t() @ st.a).mul_(lo.scaling)
    if row_perm is not None:
        dB = dB.index_select(0, torch.argsort(row_perm))  # back to B's own row order
    da = (g @ B).mul_(lo.scaling)  # (N, r)
    xin = x.to(lo.A.dtype)
    if st.mask is not None:
        xin = torch.where(st.mask, xin, 0.0)
    dA = (da.t() @ xin).mul_(st.inv_keep)
    if dx is not None:
        dxin = da @ lo.A
        if st.mask is not None:
            dxin = torch.where(st.mask, dxin, 0.0).mul_(st.inv_keep)
        dx.add_(dxin.to(dx.dtype))
    return dA, dB


_flash = None
_flash_bwd = None


def _flash_ops():
    global _flash, _flash_bwd
    if _flash is None:
        _flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        _flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    return _flash, _flash_bwd


@dataclass
class _AttnSpec:
    norm_w: torch.Tensor
    eps: float
    q: _Proj
    k: _Proj
    v: _Proj
    o: _Proj
    n_heads: int
    n_kv: int
    head_dim: int
    scale: float
    perm_q: torch.Tensor  # row permutation: half-rotation layout -> interleaved pairs
    perm_k: torch.Tensor
    w_qkv: torch.Tensor  # (Q + 2K, H): q (rows permuted), k (permuted), v weights as one matrix
    b_qkv: Optional[torch.Tensor]  # (Q + 2K,) their biases likewise (zeros for a missing one), or None
    groups: list["Group"]  # the causal sequences attention runs over (one per example)
    ops: PointwiseOps  # RMSNorm forward / backward, eager or compiled


def _rope_(t: torch.Tensor, freqs: torch.Tensor, heads: int, d: int) -> None:
    """Rotate (N, heads * d) in place; rows are interleaved pairs (re, im) per frequency."""
    n = t.shape[0]
    if t.dtype == torch.float32:
        c = torch.view_as_complex(t.view(n, heads, d // 2, 2))
        c.mul_(freqs)
    else:
        c = torch.view_as_complex(t.float().view(n, heads, d // 2, 2).contiguous()) * freqs
        t.copy_(torch.view_as_real(c).view(n, heads * d))


Group = list[tuple[int, int, bool]]
"""One example as packed rows: ranges [start, end) laid end to end form its causal sequence.
The flag says whether this example's attention output for that range is the one kept: a prompt
prefix shared by several examples is stored once and attended to by each of them."""


def _gather(t: torch.Tensor, group: Group) -> torch.Tensor:
    """Rows of ``group`` as one (L, heads, d) tensor: a view when the group is one range."""
    if len(group) == 1:
        s, e, _ = group[0]
        return t[s:e]
    return torch.cat([t[s:e] for s, e, _ in group])


def _bhld(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1)[None]  # (L, heads, d) -> (1, heads, L, d), a view


def _attention_forward(qkv: torch.Tensor, sp: _AttnSpec) -> tuple[torch.Tensor, torch.Tensor]:
    flash, _ = _flash_ops()
    n = qkv.shape[0]
    Q, K = sp.n_heads * sp.head_dim, sp.n_kv * sp.head_dim
    q = qkv[:, :Q].view(n, sp.n_heads, sp.head_dim)
    k = qkv[:, Q:Q + K].view(n, sp.n_kv, sp.head_dim)
    v = qkv[:, Q + K:].view(n, sp.n_kv, sp.head_dim)
    attn = torch.empty(n, sp.n_heads, sp.head_dim, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(sp.n_heads, n, dtype=torch.float32, device=qkv.device)
    for group in sp.groups:
        o, l = flash(_bhld(_gather(q, group)), _bhld(_gather(k, group)), _bhld(_gather(v, group)), 0.0, True, scale=sp.scale)
        o, l, at = o[0].transpose(0, 1), l[0], 0  # (L, heads, d), (heads, L)
        for s, e, keep in group:
            if keep:
                attn[s:e].copy_(o[at:at + e - s])
                lse[:, s:e].copy_(l[:, at:at + e - s])
            at += e - s
    return attn.view(n, Q), lse


# PyTorch's CPU flash-attention backward is several times slower in bf16 than in fp32 on short
# sequences, while its forward is faster in bf16. Measured with benchmarks/attention_backward.py on
# a 2-core Intel Xeon with AMX, 9 query / 3 key-value heads of 64, ms per backward call, bf16 vs
# fp32 (upcasts included): L=32 0.89 vs 0.16, L=64 1.57 vs 0.34, L=128 3.43 vs 1.04, L=256 4.60 vs
# 3.19, L=512 12.0 vs 11.7, L=768 16.3 vs 20.5. So a bf16 step runs the forward in bf16 and, for
# sequences shorter than this, the backward in fp32 on upcast copies (also the more accurate).
FP32_BACKWARD_BELOW = 512


def _group_len(group: Group) -> int:
    return sum(e - s for s, e, _ in group)


def _attention_backward(dattn: torch.Tensor, qkv: torch.Tensor, attn: torch.Tensor, lse: torch.Tensor, sp: _AttnSpec) -> torch.Tensor:
    """d(qkv), in fp32 when any sequence ran its backward in fp32 (see FP32_BACKWARD_BELOW), else
    in qkv's dtype. A shared range gets the output gradient once (in the group that kept its
    output; zero elsewhere, which contributes nothing) and key/value gradients from every group."""
    _, flash_bwd = _flash_ops()
    n = qkv.shape[0]
    Q, K = sp.n_heads * sp.head_dim, sp.n_kv * sp.head_dim
    shape_q, shape_kv = (n, sp.n_heads, sp.head_dim), (n, sp.n_kv, sp.head_dim)

    def views(qkv_t, attn_t, dattn_t):  # (q, k, v, o, do) as (n, heads, d) views
        return (qkv_t[:, :Q].view(shape_q), qkv_t[:, Q:Q + K].view(shape_kv), qkv_t[:, Q + K:].view(shape_kv),
                attn_t.view(shape_q), dattn_t.view(shape_q))

    native = views(qkv, attn, dattn)
    short = [qkv.dtype in (torch.bfloat16, torch.float16) and _group_len(g) < FP32_BACKWARD_BELOW for g in sp.groups]
    wide = views(qkv.float(), attn.float(), dattn.float()) if any(short) else None
    grad_dtype = torch.float32 if wide is not None else qkv.dtype
    shared = any(len(g) > 1 for g in sp.groups)
    dqkv = (torch.zeros if shared else torch.empty)(qkv.shape, dtype=grad_dtype, device=qkv.device)
    dq, dk, dv = dqkv[:, :Q].view(shape_q), dqkv[:, Q:Q + K].view(shape_kv), dqkv[:, Q + K:].view(shape_kv)
    for group, in_fp32 in zip(sp.groups, short):
        q, k, v, o, do = wide if in_fp32 else native
        if len(group) == 1:
            dog = do[group[0][0]:group[0][1]]
        else:
            dog = torch.cat([do[s:e] if keep else torch.zeros_like(do[s:e]) for s, e, keep in group])
        lg = lse[:, group[0][0]:group[0][1]] if len(group) == 1 else torch.cat([lse[:, s:e] for s, e, _ in group], dim=1)
        gq, gk, gv = flash_bwd(_bhld(dog), _bhld(_gather(q, group)), _bhld(_gather(k, group)), _bhld(_gather(v, group)),
                               _bhld(_gather(o, group)), lg[None].contiguous(), 0.0, True, scale=sp.scale)
        gq, gk, gv, at = gq[0].transpose(0, 1), gk[0].transpose(0, 1), gv[0].transpose(0, 1), 0
        for s, e, keep in group:
            if len(group) == 1:
                dq[s:e].copy_(gq)
                dk[s:e].copy_(gk)
                dv[s:e].copy_(gv)
            else:
                if keep:
                    dq[s:e].add_(gq[at:at + e - s])
                dk[s:e].add_(gk[at:at + e - s])
                dv[s:e].add_(gv[at:at + e - s])
            at += e - s
    return dqkv


def _lora_params(*projs: _Proj) -> list[torch.Tensor]:
    out = []
    for p in projs:
        if p.lora is not None:
            out += [p.lora.A, p.lora.B]
    return out


def _grads_for(params_grads: list[tuple[_Proj, tuple[torch.Tensor, torch.Tensor]]]) -> list[torch.Tensor]:
    out = []
    for p, (dA, dB) in params_grads:
        out += [dA.to(p.lora.A.dtype), dB.to(p.lora.B.dtype)]
    return out


class _AttnBlock(torch.autograd.Function):
    """x + o_proj(attention(rope(qkv(rmsnorm(x))))), LoRA on any of q/k/v/o."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, freqs: torch.Tensor, sp: _AttnSpec, *params: torch.Tensor) -> torch.Tensor:
        xr, rstd = sp.ops.rms(x, sp.eps)
        xn = xr * sp.norm_w
        qkv = xn @ sp.w_qkv.t() if sp.b_qkv is None else torch.addmm(sp.b_qkv, xn, sp.w_qkv.t())
        Q, K = sp.n_heads * sp.head_dim, sp.n_kv * sp.head_dim
        sl = {"q": slice(0, Q), "k": slice(Q, Q + K), "v": slice(Q + K, Q + 2 * K)}
        perms = {"q": sp.perm_q, "k": sp.perm_k, "v": None}
        lora_st = {}
        xa = _as_adapter_dtype(xn, (sp.q, sp.k, sp.v))
        for name in ("q", "k", "v"):
            p = getattr(sp, name)
            if p.lora is not None:
                lora_st[name] = _lora_forward(xa, p.lora, qkv[:, sl[name]], perms[name])
        del xn, xa
        _rope_(qkv[:, :Q], freqs, sp.n_heads, sp.head_dim)
        _rope_(qkv[:, Q:Q + K], freqs, sp.n_kv, sp.head_dim)
        attn, lse = _attention_forward(qkv, sp)
        out = torch.addmm(x if sp.o.bias is None else x + sp.o.bias, attn, sp.o.weight.t())
        if sp.o.lora is not None:
            lora_st["o"] = _lora_forward(attn, sp.o.lora, out)
        ctx.sp = sp
        _save(ctx, [xr, rstd, qkv, attn, lse, freqs], lora_st)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        sp = ctx.sp
        (xr, rstd, qkv, attn, lse, freqs), lora_st = _load(ctx)
        need_x = ctx.needs_input_grad[0]
        grads: list = []
        dattn = dout @ sp.o.weight
        if sp.o.lora is not None:
            grads.append((sp.o, _lora_backward(attn, sp.o.lora, lora_st["o"], dout, dattn)))
        dqkv = _attention_backward(dattn, qkv, attn, lse, sp)
        del dattn
        Q, K = sp.n_heads * sp.head_dim, sp.n_kv * sp.head_dim
        conj = freqs.conj()
        _rope_(dqkv[:, :Q], conj, sp.n_heads, sp.head_dim)
        _rope_(dqkv[:, Q:Q + K], conj, sp.n_kv, sp.head_dim)
        xn = xr * sp.norm_w
        dxn = None
        if need_x:
            dxn = dqkv.to(sp.w_qkv.dtype) @ sp.w_qkv
        sl = {"q": slice(0, Q), "k": slice(Q, Q + K), "v": slice(Q + K, Q + 2 * K)}
        perms = {"q": sp.perm_q, "k": sp.perm_k, "v": None}
        xa = _as_adapter_dtype(xn, (sp.q, sp.k, sp.v))
        for name in ("q", "k", "v"):
            p = getattr(sp, name)
            if p.lora is not None:
                grads.append((p, _lora_backward(xa, p.lora, lora_st[name], dqkv[:, sl[name]], dxn, perms[name])))
        dx = None
        if need_x:
            dx = sp.ops.rms_backward(dxn.mul_(sp.norm_w), xr, rstd, dout)
        order = [sp.q, sp.k, sp.v, sp.o]
        by_proj = {id(p): g for p, g in grads}
        flat = _grads_for([(p, by_proj[id(p)]) for p in order if p.lora is not None])
        return (dx, None, None, *flat)


@dataclass
class _MlpSpec:
    norm_w: torch.Tensor
    eps: float
    gate: _Proj
    up: _Proj
    down: _Proj
    ops: PointwiseOps  # RMSNorm and SwiGLU forward / backward, eager or compiled


def _linear(x: torch.Tensor, p: _Proj) -> torch.Tensor:
    return torch.addmm(p.bias, x, p.weight.t()) if p.bias is not None else x @ p.weight.t()


class _MlpBlock(torch.autograd.Function):
    """x + down(silu(gate(rmsnorm(x))) * up(rmsnorm(x))), LoRA on any of gate/up/down."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: _MlpSpec, *params: torch.Tensor) -> torch.Tensor:
        xr, rstd = sp.ops.rms(x, sp.eps)
        xn = xr * sp.norm_w
        g, u = _linear(xn, sp.gate), _linear(xn, sp.up)
        lora_st = {}
        xa = _as_adapter_dtype(xn, (sp.gate, sp.up))
        for name, t in (("gate", g), ("up", u)):
            p = getattr(sp, name)
            if p.lora is not None:
                lora_st[name] = _lora_forward(xa, p.lora, t)
        del xn, xa
        h = sp.ops.swiglu(g, u)
        out = torch.addmm(x if sp.down.bias is None else x + sp.down.bias, h, sp.down.weight.t())
        if sp.down.lora is not None:
            lora_st["down"] = _lora_forward(h, sp.down.lora, out)
        del h
        ctx.sp = sp
        _save(ctx, [xr, rstd, g, u], lora_st)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        sp = ctx.sp
        (xr, rstd, g, u), lora_st = _load(ctx)
        need_x = ctx.needs_input_grad[0]
        grads = {}
        dh = dout @ sp.down.weight
        if sp.down.lora is not None:
            grads["down"] = _lora_backward(sp.ops.swiglu(g, u), sp.down.lora, lora_st["down"], dout, dh)
        dg, du = sp.ops.swiglu_backward(dh, g, u)
        del dh
        xn = _as_adapter_dtype(xr * sp.norm_w, (sp.gate, sp.up)) if (sp.gate.lora is not None or sp.up.lora is not None) else None
        dxn = None
        if need_x:
            dxn = dg @ sp.gate.weight
            dxn.addmm_(du, sp.up.weight)
        for name, d in (("gate", dg), ("up", du)):
            p = getattr(sp, name)
            if p.lora is not None:
                grads[name] = _lora_backward(xn, p.lora, lora_st[name], d, dxn)
        dx = sp.ops.rms_backward(dxn.mul_(sp.norm_w), xr, rstd, dout) if need_x else None
        flat = _grads_for([(getattr(sp, n), grads[n]) for n in ("gate", "up", "down") if getattr(sp, n).lora is not None])
        return (dx, None, *flat)


def _pair_perm(heads: int, d: int, device: torch.device) -> torch.Tensor:
    """Rows of a (heads * d, in) projection reordered so that dims (j, j + d/2) of each head,
    which rotary embedding rotates together, become neighbours (2j, 2j + 1)."""
    half = torch.arange(d // 2, device=device)
    one = torch.stack([half, half + d // 2], dim=1).reshape(-1)
    return (torch.arange(heads, device=device)[:, None] * d + one[None, :]).reshape(-1)


class FusedLlama:
    """Frozen-base Llama-family decoder (llama, mistral, qwen2 layouts) with LoRA adapters.

    Built per call from the live modules, so adapters added, switched or put in eval mode are
    seen. :meth:`check` raises :class:`Unsupported` for anything it does not compute exactly.
    """

    MODEL_TYPES = ("llama", "mistral", "qwen2")

    def __init__(self, model: nn.Module, compile_pointwise: bool = False):
        """``compile_pointwise``: run RMSNorm and SwiGLU through ``torch.compile`` (see
        :mod:`.pointwise`: faster steps, seconds of compiling per process)."""
        self.model = model
        self.lm = unwrap_causal_lm(model)
        self.ops = pointwise_ops(compile_pointwise)
        self._qkv_cache: dict[int, tuple] = {}
        self.check()

    def check(self) -> None:
        lm = self.lm
        cfg = getattr(lm, "config", None)
        mt = getattr(cfg, "model_type", None)
        if mt not in self.MODEL_TYPES:
            raise Unsupported(f"model type {mt!r} (fused decoder: {', '.join(self.MODEL_TYPES)})")
        dev = next(lm.parameters()).device
        if dev.type != "cpu":
            # the attention kernels called here are PyTorch's CPU flash attention; on CUDA the
            # transformers forward with SDPA / flash attention is the fast path
            raise Unsupported(f"device {dev.type} (the fused decoder is the CPU fast path)")
        dec = getattr(lm, "model", None)
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(dec, attr):
                raise Unsupported(f"decoder without {attr}")
        if getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
            raise Unsupported(f"activation {cfg.hidden_act!r}")
        if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
            raise Unsupported("attention dropout")
        if lm.get_output_embeddings() is None or getattr(lm.get_output_embeddings(), "bias", None) is not None:
            raise Unsupported("lm_head with a bias")
        if dec.embed_tokens.weight.requires_grad or lm.get_output_embeddings().weight.requires_grad:
            raise Unsupported("the embeddings train")
        for layer in dec.layers:
            att, mlp = layer.self_attn, layer.mlp
            if hasattr(att, "q_norm") or hasattr(att, "k_norm"):
                raise Unsupported("q/k norms")
            for norm in (layer.input_layernorm, layer.post_attention_layernorm, dec.norm):
                if norm.weight.requires_grad:
                    raise Unsupported("trainable norms")
            if getattr(att, "sliding_window", None):
                raise Unsupported("sliding-window attention")
            for m in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                _proj(m)

    def _qkv(self, i: int, q: _Proj, k: _Proj, v: _Proj, nh: int, nkv: int, d: int, device: torch.device):
        """Layer i's row permutations and fused q/k/v weight and bias, rebuilt only when one of
        them changes (another tensor, or the same one written in place): otherwise 30 layers x
        2 MB of copies per pass."""
        tensors = [t for p in (q, k, v) for t in (p.weight, p.bias) if t is not None]
        key = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        hit = self._qkv_cache.get(i)
        if hit is None or hit[0] != key:
            perm_q, perm_k = _pair_perm(nh, d, device), _pair_perm(nkv, d, device)
            w = torch.cat([q.weight.index_select(0, perm_q), k.weight.index_select(0, perm_k), v.weight])
            b = None
            if any(p.bias is not None for p in (q, k, v)):
                bias = lambda p: p.bias if p.bias is not None else w.new_zeros(p.weight.shape[0])  # noqa: E731
                b = torch.cat([bias(q).index_select(0, perm_q), bias(k).index_select(0, perm_k), bias(v)])
            hit = self._qkv_cache[i] = (key, perm_q, perm_k, w, b)
        return hit[1:]

    def _specs(self, groups: list[Group], device: torch.device):
        dec = self.lm.model
        cfg = self.lm.config
        specs = []
        for i, layer in enumerate(dec.layers):
            att, mlp = layer.self_attn, layer.mlp
            d = att.head_dim
            nh = cfg.num_attention_heads
            nkv = cfg.num_key_value_heads
            q, k, v = _proj(att.q_proj), _proj(att.k_proj), _proj(att.v_proj)
            a = _AttnSpec(layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon),
                          q, k, v, _proj(att.o_proj), nh, nkv, d, float(att.scaling), *self._qkv(i, q, k, v, nh, nkv, d, device), groups, self.ops)
            m = _MlpSpec(layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon),
                         _proj(mlp.gate_proj), _proj(mlp.up_proj), _proj(mlp.down_proj), self.ops)
            specs.append((a, m))
        return specs

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, groups: list[Group]) -> torch.Tensor:
        """Last hidden states (N, H), before the final norm, of packed rows (see :data:`Group`)."""
        dec = self.lm.model
        with torch.no_grad():
            x = dec.embed_tokens(ids)
            cos, sin = dec.rotary_emb(x[None], positions[None])
            cos, sin = cos[0].float(), sin[0].float()
            half = cos.shape[-1] // 2
            if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
                raise Unsupported("rotary embedding layout")
            freqs = torch.complex(cos[:, :half], sin[:, :half]).unsqueeze(1)  # (N, 1, d/2)
        for layer, (a, m) in zip(dec.layers, self._specs(groups, ids.device)):
            def run(x: torch.Tensor, a: _AttnSpec = a, m: _MlpSpec = m) -> torch.Tensor:
                x = _AttnBlock.apply(x, freqs, a, *_lora_params(a.q, a.k, a.v, a.o))
                return _MlpBlock.apply(x, m, *_lora_params(m.gate, m.up, m.down))

            if getattr(layer, "gradient_checkpointing", False) and torch.is_grad_enabled():
                # model.gradient_checkpointing_enable() (train.gradient_checkpointing): keep the
                # layer's input only and recompute the layer in backward (same RNG, same masks)
                x = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
            else:
                x = run(x)
        return x
