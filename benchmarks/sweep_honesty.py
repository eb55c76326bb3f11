"""How often the short-budget sweep winner is also the full-budget winner.

Runs the same LR x rank grid twice with ``tunelab sweep``: once at ``--budget`` (default 0.25)
and once at 1.0 (each trial the full run), on the embedded SmolLM2-135M and a real task from
../shared/data, then compares the winners and the rankings. Expensive: each full trial is a full
run. Written for tunelab.

    python benchmarks/sweep_honesty.py --task t0/amazon_polarity_Is_this_review.jsonl \\
        --lr 1e-4,4e-4,2e-3 --rank 8 --steps 16 --out /tmp/honesty
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def sweep(cfg: Path, lr: str, rank: str, budget: float, out: Path, jobs: int) -> list[dict]:
    cmd = [sys.executable, "-m", "tunelab", "sweep", str(cfg), "--lr", lr, "--rank", rank, "--budget", str(budget), "--out", str(out)]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout)
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])
    return [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="t0/amazon_polarity_Is_this_review.jsonl", help="file under ../shared/data")
    ap.add_argument("--lr", default="1e-4,4e-4,2e-3")
    ap.add_argument("--rank", default="8")
    ap.add_argument("--steps", type=int, default=16, help="the full run's steps")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--out", default="/tmp/sweep-honesty")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "task.yaml"
    cfg.write_text(f"name: honesty\nmodel: {{name: smollm2-135m-instruct}}\noutput_dir: {out / 'run'}\n"
                   f"data: {{train: [{SHARED / a.task}], eval_fraction: 0.1, max_seq_len: {a.max_seq_len}}}\n"
                   f"train: {{max_steps: {a.steps}, batch_size: {a.batch}, seed: 0}}\nreport: {{samples: 0}}\n")
    short = sweep(cfg, a.lr, a.rank, a.budget, out / "short", a.jobs)
    full = sweep(cfg, a.lr, a.rank, 1.0, out / "full", a.jobs)
    ws = next(t for t in short if t["winner"])
    wf = next(t for t in full if t["winner"])
    order = lambda ts: [(t["lr"], t["rank"]) for t in sorted(ts, key=lambda t: t["eval_loss"])]
    res = {"task": a.task, "grid": {"lr": a.lr, "rank": a.rank}, "full_steps": a.steps, "budget": a.budget,
           "short_winner": [ws["lr"], ws["rank"]], "full_winner": [wf["lr"], wf["rank"]],
           "same_winner": (ws["lr"], ws["rank"]) == (wf["lr"], wf["rank"]),
           "short_order": order(short), "full_order": order(full),
           "short": {t["trial"]: t["eval_loss"] for t in short}, "full": {t["trial"]: t["eval_loss"] for t in full}}
    (out / "honesty.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
