"""PyTorch's CPU flash-attention backward in bf16 against fp32, by sequence length.

    python benchmarks/attention_backward.py
    python benchmarks/attention_backward.py --lengths 64,256,1024 --heads 9 --kv-heads 3 --head-dim 64

The fused decoder (``tunelab.kernels.fused_llama``) runs a bf16 step's attention forward in bf16
and, for sequences shorter than ``FP32_BACKWARD_BELOW`` tokens, its backward in fp32 on upcast
copies, because on the machines measured the bf16 backward kernel is several times slower on
short sequences. This script measures both per length, on the embedded SmolLM2-135M's attention
shape by default (9 query heads, 3 key-value heads, 64 dims), and prints for each length the
bf16 backward, the fp32 backward (the upcast of q, k, v, o and dO included) and their ratio, then
``threshold T fp32/bf16 at the lengths below it: R`` where R is the summed ratio over the
lengths the fused decoder sends to fp32. Needs a CPU with native bf16 (avx512_bf16 or AMX) to
mean anything: where bf16 is emulated the fused decoder runs fp32 throughout.
"""

from __future__ import annotations

import argparse
import time

import torch

from tunelab.kernels.fused_llama import FP32_BACKWARD_BELOW


def best(fn, reps: int) -> float:
    fn()
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32,64,128,192,256,384,512,768,1024,1536,2048")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7, help="timed calls per cell (best is kept)")
    args = ap.parse_args()
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    nh, nkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
          f"heads {nh}/{nkv}x{d}, FP32_BACKWARD_BELOW {FP32_BACKWARD_BELOW}")
    print(f"{'L':>6} {'bf16 ms':>9} {'fp32 ms':>9} {'fp32/bf16':>10}")
    below_bf16 = below_fp32 = 0.0
    g = torch.Generator().manual_seed(0)
    for n in (int(x) for x in args.lengths.split(",")):
        q, k, v, do = (torch.randn(1, h, n, d, generator=g).bfloat16() for h in (nh, nkv, nkv, nh))
        o, lse = flash(q, k, v, 0.0, True, scale=scale)[:2]
        t_bf16 = best(lambda: flash_bwd(do, q, k, v, o, lse, 0.0, True, scale=scale), args.reps)
        t_fp32 = best(lambda: flash_bwd(do.float(), q.float(), k.float(), v.float(), o.float(), lse, 0.0, True, scale=scale),
                      args.reps)
        print(f"{n:>6} {t_bf16 * 1e3:9.2f} {t_fp32 * 1e3:9.2f} {t_fp32 / t_bf16:10.2f}")
        if n < FP32_BACKWARD_BELOW:
            below_bf16, below_fp32 = below_bf16 + t_bf16, below_fp32 + t_fp32
    if below_bf16:
        print(f"threshold {FP32_BACKWARD_BELOW} fp32/bf16 at the lengths below it: {below_fp32 / below_bf16:.2f}")


if __name__ == "__main__":
    main()
