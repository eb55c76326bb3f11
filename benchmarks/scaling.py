#!/usr/bin/env python
"""Tokens/s and peak RSS of tunelab's training step across sequence lengths and batch sizes.

    python benchmarks/scaling.py                          # the 3 x 3 grid, 1 warm-up + 2 timed steps per cell
    python benchmarks/scaling.py --steps 1                # 1 timed step per cell (~30 min on 2 cores)
    python benchmarks/scaling.py --cells 128x8 512x8      # some cells
    python benchmarks/scaling.py --budget-s 900           # skip cells whose estimate exceeds 15 min

Each cell runs in its own subprocess (so peak RSS is that cell's), on SmolLM2-135M-Instruct with
the benchmark's LoRA (r=16, alpha 32, dropout 0.05, q/v) and tunelab's default fast path: the
same inner loop as the recipe (split_by_tokens -> collate -> CausalLMLoss -> backward, clip,
AdamW). Examples are synthetic: B sequences of exactly L random tokens, the first quarter prompt
(untrained), the rest completion (trained); random tokens share no prompt prefix, so the
shared-prefix saving does not apply here. tokens/s = B * L / (seconds per optimizer step), the
median of the timed steps. A cell whose estimated time exceeds ``--budget-s`` is reported as
skipped with that estimate, never filled in.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/train_speed.py (see there)

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SEQS = (128, 512, 2048)
BATCHES = (1, 8, 32)


def worker(seq: int, batch: int, steps: int, warmup: int, max_tokens_per_pass: int | None) -> dict:
    import torch

    from tunelab.config import config_from_dict
    from tunelab.data.batching import collate, split_by_tokens
    from tunelab.data.render import IGNORE, EncodedExample
    from tunelab.models.build import build_model
    from tunelab.train.loss import CausalLMLoss

    train = {"max_tokens_per_pass": max_tokens_per_pass} if max_tokens_per_pass else {}
    cfg = config_from_dict({"model": {"name": "smollm2-135m-instruct", "dtype": "fp32"},
                            "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "targets": "qv"}, "train": train})
    torch.manual_seed(0)
    built = build_model(cfg, torch.device("cpu"))
    model, tok = built.model, built.tokenizer
    g = torch.Generator().manual_seed(seq * 1000 + batch)
    examples = []
    for _ in range(batch):
        ids = torch.randint(100, len(tok) - 100, (seq,), generator=g).tolist()
        cut = seq // 4
        examples.append(EncodedExample(ids, [IGNORE] * cut + ids[cut:]))
    loss_fn = CausalLMLoss(model, cfg.train.trained_logits_only, cfg.train.fused_decoder, cfg.train.shared_prefix).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    times = []
    for step in range(warmup + steps):
        t = time.perf_counter()
        # warm-up steps (code paths, and the allocator: a pass's first large tensors page-fault
        # in) on one full-size pass, not the whole batch: a 2048 x 32 warm-up step would cost
        # as much as the measurement
        per_pass = max(1, (cfg.train.max_tokens_per_pass or seq * batch) // seq)
        batch_examples = examples[:per_pass] if step < warmup else examples
        parts = [collate(p, tok.pad_token_id) for p in split_by_tokens(batch_examples, cfg.train.max_tokens_per_pass)]
        n_total = sum(b.n_trained for b in parts)
        for b in parts:
            loss, _ = loss_fn(b.input_ids, b.attention_mask, b.labels)
            (loss / n_total).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        if step >= warmup:
            times.append(dt)
        print(f"    step {step + 1}: {dt:.1f} s", file=sys.stderr, flush=True)
    sec = statistics.median(times)
    return {"seq": seq, "batch": batch, "tokens": seq * batch, "step_s": sec, "step_s_all": times,
            "tokens_per_s": seq * batch / sec, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "fused": loss_fn.fused_reason, "passes": len(split_by_tokens(examples, cfg.train.max_tokens_per_pass)),
            "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", nargs="*", help="SEQxBATCH cells (default: all 9)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per cell")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=1800, help="skip a cell whose estimated time exceeds this")
    ap.add_argument("--max-tokens-per-pass", type=int, default=0, help="0: tunelab's default")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        seq, batch = map(int, args.worker.split("x"))
        print("RESULT " + json.dumps(worker(seq, batch, args.steps, args.warmup, args.max_tokens_per_pass)))
        return 0

    cells = [tuple(map(int, c.split("x"))) for c in args.cells] if args.cells else [(s, b) for s in SEQS for b in BATCHES]
    cells.sort(key=lambda c: c[0] * c[1])  # small first: their speed estimates the big ones
    results, rate = [], None  # rate: tokens/s of the last cell measured, for estimates
    from tunelab.config import TrainConfig

    per_pass = args.max_tokens_per_pass or TrainConfig().max_tokens_per_pass or 0  # the worker's warm-up is one such pass
    for seq, batch in cells:
        tokens = seq * batch * args.steps + args.warmup * min(seq * batch, max(seq, per_pass))
        if rate is not None:
            # attention grows with the length: scale the estimate by (1 + seq / 1500) relative to the last cell
            est = tokens / rate * (1 + seq / 1500) / (1 + results[-1]["seq"] / 1500) + 30
            if est > args.budget_s:
                print(f"{seq:>5} x {batch:<3} skipped: estimated {est / 60:.0f} min > budget {args.budget_s / 60:.0f} min "
                      f"(at the {rate:.0f} tokens/s just measured)", flush=True)
                results.append({"seq": seq, "batch": batch, "skipped": f"estimated {est:.0f} s"})
                continue
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", f"{seq}x{batch}", "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--max-tokens-per-pass", str(args.max_tokens_per_pass)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{seq:>5} x {batch:<3} failed (exit {proc.returncode}): {proc.stderr[-800:]}", flush=True)
            results.append({"seq": seq, "batch": batch, "failed": proc.returncode})
            continue
        r = json.loads(line[7:])
        r["wall_s"] = time.perf_counter() - t
        rate = r["tokens_per_s"]
        results.append(r)
        print(f"{seq:>5} x {batch:<3} {r['tokens_per_s']:7.1f} tokens/s  step {r['step_s']:7.1f} s  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB  "
              f"({r['passes']} pass(es)/step, steps {', '.join(f'{x:.1f}' for x in r['step_s_all'])} s)", flush=True)

    print("\n| seq \\ batch | " + " | ".join(str(b) for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    for s in SEQS:
        row = []
        for b in BATCHES:
            r = next((x for x in results if x["seq"] == s and x["batch"] == b), None)
            if r is None:
                row.append("not run")
            elif "tokens_per_s" in r:
                row.append(f"{r['tokens_per_s']:.0f} tok/s, {r['peak_rss'] / 2**30:.2f} GiB")
            else:
                row.append("skipped (" + r.get("skipped", "failed") + ")")
        print(f"| {s} | " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
