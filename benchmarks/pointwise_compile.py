#!/usr/bin/env python
"""The fused decoder's pointwise steps eager vs through torch.compile (train.compile_pointwise).

    python benchmarks/pointwise_compile.py              # 8 paired rounds on the first batch
    python benchmarks/pointwise_compile.py --rounds 12 --batches 2

Same model, data and batches as benchmarks/train_speed.py (the embedded SmolLM2, LoRA r=16 on
q/v with dropout 0.05, alpaca_en_demo.json from ../shared/data, micro-batch 8), in the faster
measured precision. It times the compiling (first forward + backward with compiled steps, minus
an eager one), then forward + backward of the same batches eager and compiled in alternating
rounds, so the VM's drift hits both. The last line is ``speedup Nx compile_s S precision P``
(median eager round / median compiled round).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train_speed.py

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    a = ap.parse_args()
    if not train_speed.DATA.exists():
        print(f"skip: {train_speed.DATA} is absent")
        return 0
    import torch

    from tunelab.config import config_from_dict
    from tunelab.data.batching import collate, split_by_tokens
    from tunelab.data.render import EncodedExample
    from tunelab.models.build import build_model
    from tunelab.train.loss import CausalLMLoss

    prec = a.precision
    if prec == "auto":
        prec = "bf16" if train_speed.matmul_peak("bf16", budget_s=1.0) > train_speed.matmul_peak("fp32") else "fp32"
    ns = argparse.Namespace(steps=a.batches, batch=8, lr=2e-4, seed=42, max_seq_len=1024, trl_gc=True, tunelab_set=[])
    plan = train_speed.build_plan(ns, {"tunelab": prec})
    cfg = config_from_dict(train_speed.tunelab_config(ns, prec, "unused"))
    torch.manual_seed(0)
    built = build_model(cfg, torch.device("cpu"))
    fns = {c: CausalLMLoss(built.model, True, True, cfg.train.shared_prefix, compile_pointwise=c).train() for c in (False, True)}
    params = [p for p in built.model.parameters() if p.requires_grad]
    exs = [EncodedExample(e["input_ids"], e["labels"]) for e in plan["examples"]]

    def run(compiled: bool) -> tuple[float, int]:
        t, tokens = time.perf_counter(), 0
        for k in range(a.batches):
            parts = [collate(p, built.tokenizer.pad_token_id) for p in split_by_tokens(exs[k * 8:(k + 1) * 8], cfg.train.max_tokens_per_pass)]
            n = sum(x.n_trained for x in parts)
            for x in parts:
                loss, _ = fns[compiled](x.input_ids, x.attention_mask, x.labels)
                (loss / n).backward()
                tokens += x.n_real
            for p in params:
                p.grad = None
        return time.perf_counter() - t, tokens

    first_eager, _ = run(False)
    first_compiled, tokens = run(True)
    compile_s = max(0.0, first_compiled - first_eager)
    print(f"precision {prec}; {tokens} tokens per round; first round eager {first_eager:.1f} s, compiled {first_compiled:.1f} s "
          f"(compiling ~{compile_s:.1f} s)", flush=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(a.rounds):
        for c in ((False, True) if r % 2 == 0 else (True, False)):
            times[c].append(run(c)[0])
    for c in (False, True):
        m = statistics.median(times[c])
        print(f"  {'compiled' if c else 'eager':<8} rounds {' '.join(f'{x:.2f}' for x in times[c])} s; median {m:.2f} s, {tokens / m:.1f} tokens/s")
    print(f"speedup {statistics.median(times[False]) / statistics.median(times[True]):.2f}x compile_s {compile_s:.1f} precision {prec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
