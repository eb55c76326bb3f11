"""What bounds training speed on this CPU: the kernels' own rates on the benchmark's shapes.

    python benchmarks/ceiling.py                  # the precision train_speed.py's auto picks
    python benchmarks/ceiling.py --precision fp32

``benchmarks/train_speed.py`` reports MFU against the square-matmul peak. This script asks what
MFU a step could reach if it did *nothing but* its matmuls and its attention kernel calls, each at
the rate those kernels actually reach here on the shapes the step runs: the micro-batches of the
benchmark's default workload (same data, masking, steps, packing), the decoder's linear layers
forward + input-gradient (the base is frozen), the q/v LoRA matmuls, PyTorch's CPU flash
attention forward + backward per example at its real length, and the lm_head at trained rows
only (in the loss's 512-row chunks). Dtype casts, norms, RoPE, SiLU, dropout, the optimizer and
Python are counted as free, so the figure is an upper bound: a system whose measured MFU is near
it has little left to gain outside the kernels themselves.

Prints each stage's kernel time and rate, the floor time of the run, and the last line
``ceiling tokens/s T mfu M% precision P cpu KIND`` against the peak train_speed.py measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train_speed.py: same threading behaviour

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed as ts  # noqa: E402  (the plan, the FLOP count and the peak are the benchmark's own)
from tunelab.kernels.fused_llama import FP32_BACKWARD_BELOW  # noqa: E402


def best_time(fn, budget_s: float, min_reps: int = 3) -> float:
    """Best wall time of ``fn()`` over ``min_reps`` calls or ``budget_s`` seconds, after one warm-up."""
    fn()
    best, reps, end = float("inf"), 0, time.perf_counter() + budget_s
    while reps < min_reps or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per kernel shape")
    ap.add_argument("--lm-chunk", type=int, default=512, help="lm_head rows per chunk (the loss's chunk)")
    args = ap.parse_args()
    if not ts.DATA.exists():
        print(f"skip: {ts.DATA} is absent")
        return 0
    import torch

    peaks = {"fp32": ts.matmul_peak("fp32"), "bf16": ts.matmul_peak("bf16", budget_s=1.0)}
    precision = max(peaks, key=peaks.get) if args.precision == "auto" else args.precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    bench_args = argparse.Namespace(steps=args.steps, batch=args.batch, max_seq_len=args.max_seq_len, lr=2e-4, seed=42,
                                    tunelab_set=[], trl_gc=True)
    plan = ts.build_plan(bench_args, {"tunelab": precision})
    c = plan["model_config"]
    h, L, V, inter = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // nh
    Q, K, r = nh * hd, nkv * hd, 16

    ex = plan["examples"]
    lengths = [len(e["input_ids"]) for e in ex]
    trained = [sum(1 for x in e["labels"][1:] if x != ts.IGNORE) for e in ex]
    per_step = [sum(lengths[i * args.batch:(i + 1) * args.batch]) for i in range(args.steps)]
    rows_typ = int(statistics.median(per_step))  # packed rows of a typical micro-batch
    print(f"cpu {ts.cpu_kind()}, {torch.get_num_threads()} threads; peak fp32 {peaks['fp32']:.1f}, bf16 {peaks['bf16']:.1f} "
          f"GFLOP/s -> {precision}; {len(ex)} examples, {sum(lengths)} tokens, median {rows_typ} packed rows per micro-batch")

    def rand(*shape):
        return torch.randn(*shape).to(dtype)

    # Linear layers of one decoder layer at the typical micro-batch: forward y = x W^T and the input
    # gradient dx = dy W (no weight gradient: the base is frozen). Seconds per packed row.
    linear_shapes = {"qkv": (h, Q + 2 * K), "o": (Q, h), "gate+up": (h, 2 * inter), "down": (inter, h)}
    stage = {}
    for name, (fin, fout) in linear_shapes.items():
        x, w, dy = rand(rows_typ, fin), rand(fout, fin), rand(rows_typ, fout)
        t = best_time(lambda: (x @ w.t(), dy @ w), args.budget)
        stage[name] = (t / rows_typ, 4 * fin * fout)  # (s per row, FLOPs per row)
    # LoRA on q and v (fp32 adapters, as peft and tunelab keep them): x A^T, (xA^T) B^T forward;
    # dB, dA, dx backward.
    xa, A, B, g = torch.randn(rows_typ, h), torch.randn(r, h), torch.randn(Q, r), torch.randn(rows_typ, Q)

    def lora():
        a = xa @ A.t()
        a @ B.t()
        da = g @ B
        return g.t() @ a, da.t() @ xa, da @ A

    t = best_time(lora, args.budget)
    stage["lora q,v"] = (2 * t / rows_typ, 2 * 6 * r * (h + Q))

    # Attention per example at its real length: PyTorch's CPU flash kernel, forward + backward.
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    attn_time = {}
    for n in sorted(set(lengths)):
        # kv with their own (fewer) heads, as the fused decoder calls the kernel (GQA inside it)
        q, k, v = rand(1, nh, n, hd), rand(1, nkv, n, hd), rand(1, nkv, n, hd)

        # the backward as the fused decoder runs it: in fp32 on upcast copies for short bf16
        # sequences (FP32_BACKWARD_BELOW, faster there), else in the compute dtype
        up = precision == "bf16" and n < FP32_BACKWARD_BELOW

        def attn(q=q, k=k, v=v, up=up):
            o, lse = flash(q, k, v, 0.0, True, scale=hd ** -0.5)[:2]
            if up:
                q, k, v, o = q.float(), k.float(), v.float(), o.float()
            return flash_bwd(o, q, k, v, o, lse, 0.0, True, scale=hd ** -0.5)

        attn_time[n] = best_time(attn, min(args.budget, 0.05), min_reps=2)
    attn_s = L * sum(attn_time[n] for n in lengths)
    attn_flops = L * sum(3 * 2 * 2 * nh * hd * n * (n + 1) / 2 for n in lengths)

    # lm_head at trained rows, in chunks: logits = h E^T and dh = dlogits E (E frozen, tied).
    ch = args.lm_chunk
    hx, E, dl = rand(ch, h), rand(V, h), rand(ch, V)
    t_chunk = best_time(lambda: (hx @ E.t(), dl @ E), args.budget)
    lm_rows = sum(trained)
    lm_s = t_chunk * lm_rows / ch

    rows = sum(lengths)
    print(f"\n{'stage':<12} {'seconds':>8} {'GFLOP/s':>8}")
    total_s, total_f = 0.0, 0.0
    for name, (s_row, f_row) in stage.items():
        s, f = L * s_row * rows, L * f_row * rows
        total_s, total_f = total_s + s, total_f + f
        print(f"{name:<12} {s:8.2f} {f / s / 1e9:8.1f}")
    print(f"{'attention':<12} {attn_s:8.2f} {attn_flops / attn_s / 1e9:8.1f}   (flash fwd+bwd per example; lengths {min(lengths)}-{max(lengths)})")
    print(f"{'lm_head':<12} {lm_s:8.2f} {4 * V * h * lm_rows / lm_s / 1e9:8.1f}   ({lm_rows} trained rows, chunks of {ch})")
    total_s += attn_s + lm_s
    flops = ts.model_flops(c, [len(e["input_ids"]) for e in ex], trained)
    tps = rows / total_s
    mfu = flops / total_s / (peaks[precision] * 1e9)
    print(f"\nkernel floor of the run: {total_s:.1f} s for {rows} tokens ({flops / 1e12:.2f} TFLOP by train_speed's count); "
          f"everything outside the kernels counted as free")
    print(f"ceiling tokens/s {tps:.1f} mfu {mfu:.1%} precision {precision} cpu {ts.cpu_kind()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
