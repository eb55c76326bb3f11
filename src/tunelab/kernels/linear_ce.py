"""lm_head + cross-entropy over selected rows without materialising the logits for backward.

``linear_cross_entropy(h, W, y)`` = sum_i CE(h_i @ W^T, y_i) for h: (N, H), W: (V, H), y: (N,).
Rows are processed ``chunk`` at a time and each chunk's gradient is computed in the forward
pass, so the logits memory is one ``(chunk, V)`` buffer whatever N is (the idea of Liger-Kernel's
fused linear cross-entropy, ``ops/fused_linear_cross_entropy.py``, done here with plain torch ops
for the CPU). Imports nothing of tunelab.
"""

from __future__ import annotations

import torch

# Rows of logits materialised at once: 512 x 49k x 4 B = 100 MB for SmolLM2's vocabulary.
CE_CHUNK_ROWS = 512


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) without keeping any logits for backward.

    Rows are processed ``chunk`` at a time: logits, log-softmax, loss; and when a gradient is
    needed, ``softmax - onehot`` is turned into this chunk's ``dL/dh`` (and ``dL/dW`` when W
    trains) right away. Backward just scales the saved gradients. Log-softmax is in fp32 whatever
    the matmul dtype.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = h.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        # One (chunk, V) logits buffer for all chunks, softmax computed in place: a fresh 100 MB
        # tensor per chunk (several per chunk with log_softmax) comes from mmap on glibc and
        # page-faults on first touch: measured here, a 512 x 49152 softmax took 62 ms into fresh
        # memory and 23 ms into reused memory (docs/performance.md).
        buf = torch.empty((min(chunk, n), weight.shape[0]), dtype=torch.float32, device=h.device)
        # A bf16 (or fp16) model also gets one reused low-precision buffer for the matmul output and
        # for the softmax gradient's operand, rather than two fresh (chunk, V) tensors per chunk.
        low = None
        if weight.dtype != torch.float32 and h.dtype == weight.dtype:
            low = torch.empty((min(chunk, n), weight.shape[0]), dtype=weight.dtype, device=h.device)
        for s in range(0, n, chunk):
            hc, yc = h[s:s + chunk], targets[s:s + chunk]
            m = hc.shape[0]
            logits = buf[:m]
            if weight.dtype == torch.float32 and hc.dtype == torch.float32:
                torch.mm(hc, weight.t(), out=logits)
            elif low is not None:
                torch.mm(hc, weight.t(), out=low[:m])
                logits.copy_(low[:m])
            else:
                logits.copy_(hc @ weight.t())
            picked = logits.gather(1, yc[:, None])  # (m, 1)
            mx = logits.amax(1, keepdim=True)
            p = logits.sub_(mx).exp_()  # unnormalised softmax, in place
            total = p.sum(1, keepdim=True)
            loss += (total.log() + mx - picked).sum()  # logsumexp - logit[y]
            if need_h or need_w:
                p.div_(total)  # softmax
                p.scatter_add_(1, yc[:, None], torch.full_like(picked, -1.0))  # softmax - onehot
                pw = p if weight.dtype == torch.float32 else (low[:m].copy_(p) if low is not None else p.to(weight.dtype))
                if need_h:
                    torch.mm(pw, weight, out=dh[s:s + chunk])
                if need_w:
                    dw.addmm_(p.t(), hc.float())
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        dh, dw = ctx.saved_tensors
        dh = dh * g.to(dh.dtype) if dh is not None else None
        dw = (dw * g).to(ctx.weight_dtype) if dw is not None else None
        return dh, dw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CE_CHUNK_ROWS) -> torch.Tensor:
    """Sum of token cross-entropies of ``h @ weight.T`` against ``targets`` (all trained)."""
    return LinearCrossEntropy.apply(h, weight, targets, chunk)
