"""``tunelab diagnose RUN``: the findings of a run and its curves drawn in the terminal.

The findings come from replaying metrics.jsonl through the same :class:`Diagnoser` that watched
the run live (train/diagnosis.py), together with the diagnosis events the run recorded; the
train and eval loss curves (and the train / held-out exact-match curves of
``eval.generate_every``) are drawn as text, so no plotting library or display is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console

from ..config import load_config
from ..train.diagnosis import Finding, RunContext, replay_metrics

MARKS = "*o+x#"


def draw_curves(series: dict[str, Sequence[tuple[float, float]]], width: int = 64, height: int = 14, log: bool = False) -> str:
    """An ASCII chart of (x, y) series, one mark per series, with y and x axis labels."""
    pts = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y) and (y > 0 or not log)] for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    if not pts:
        return "(no points)"
    f = (lambda y: math.log10(y)) if log else (lambda y: y)
    xs = [x for v in pts.values() for x, _ in v]
    ys = [f(y) for v in pts.values() for _, y in v]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    grid = [[" "] * width for _ in range(height)]
    for mark, (_, v) in zip(MARKS, pts.items()):
        for x, y in v:
            c = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (width - 1))
            r = height - 1 - round((f(y) - y0) / (y1 - y0) * (height - 1))
            grid[r][c] = mark
    lab = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3g}")
    lines = []
    for i, row in enumerate(grid):
        y = y1 - (y1 - y0) * i / (height - 1)
        label = lab(y) if i in (0, height // 2, height - 1) else ""
        lines.append(f"{label:>8} |" + "".join(row))
    lines.append(" " * 9 + "+" + "-" * width)
    lines.append(" " * 10 + f"{x0:<{width // 2}g}{x1:>{width - width // 2}g}")
    lines.append(" " * 10 + "   ".join(f"{m} {k}" for m, k in zip(MARKS, pts)))
    return "\n".join(lines)


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no metrics; is {run_dir} a run dir (runs/NAME)?")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def diagnose_run(run_dir: str, console: Optional[Console] = None) -> list[Finding]:
    console = console or Console()
    rows = read_metrics(Path(run_dir))
    cfg, _ = load_config(Path(run_dir) / "config.yaml")
    run = next((r for r in rows if r.get("event") == "run"), {})
    train = [r for r in rows if r.get("event") == "train"]
    total = run.get("total_steps") or max([r["step"] for r in train], default=1)
    ctx = RunContext(total, run.get("n_train") or 0, cfg.train.warmup, cfg.train.schedule, cfg.train.min_lr_ratio,
                     cfg.train.early_stopping.patience)
    found = replay_metrics(rows, ctx).findings
    codes = {f.code for f in found}
    for r in rows:  # what the run itself recorded (e.g. with another version) and the replay did not see
        if r.get("event") == "diagnosis" and r.get("code") not in codes:
            found.append(Finding(r["code"], r["step"], r["what"], r["why"], r["fix"], r["anchor"]))
            codes.add(r["code"])
    console.print(f"[bold]tunelab diagnose[/bold] {run_dir}: {len(train)} train steps, "
                  f"{sum(1 for r in rows if r.get('event') == 'eval')} evals", highlight=False)
    if not found:
        console.print("no findings: the curves look healthy", highlight=False)
    for f in sorted(found, key=lambda f: f.step):
        console.print(f"[yellow]diagnosis:[/yellow] {f.text()}", highlight=False)
    losses = {"train loss": [(r["step"], r.get("train_loss")) for r in train],
              "eval loss": [(r["step"], r.get("eval_loss")) for r in rows if r.get("event") == "eval"]}
    console.print("\nloss (log scale)", highlight=False)
    console.print(draw_curves(losses, log=True), highlight=False, markup=False)
    probes = [r for r in rows if r.get("event") == "generate"]
    if probes:  # eval.generate_every: the train vs held-out exact-match gap over training
        last = probes[-1]
        console.print(f"\nexact match (eval.generate_every, {last.get('n_train')} train / {last.get('n_eval')} held-out prompts); "
                      f"last: train {last['train_em']:.1f}, held-out {last['eval_em']:.1f}, gap {last['train_em'] - last['eval_em']:+.1f}",
                      highlight=False)
        console.print(draw_curves({"train EM": [(r["step"], r["train_em"]) for r in probes],
                                   "held-out EM": [(r["step"], r["eval_em"]) for r in probes]}), highlight=False, markup=False)
    return found
