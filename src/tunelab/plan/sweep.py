"""``tunelab sweep CONFIG --lr 1e-4,2e-4,4e-4 --rank 8,16,32 [--budget 0.25] [--then-train]``.

Each trial is the config with one (lr, rank), run for ``budget`` x the full run's steps with
the same seed (so the same data order and the same eval set), early stopping off, its eval
loss the best of its evals (docs/practices.md#hp-sweep). The winner has the lowest eval loss;
trials within 1% of it tie, and the tie goes to the smaller rank, then the lower LR (the
cheaper, safer choice). Trials run as parallel processes when cores and memory allow, the
threads split between them; each writes ``result.json`` when it finishes, so a rerun skips
finished trials. ``sweep.jsonl`` (one line per trial) and a table are the output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import Config, ConfigError, dump_yaml
from ..files import atomic_write_json, atomic_write_jsonl, atomic_write_text

TIE = 0.01  # relative eval-loss difference under which two trials tie


@dataclass
class Trial:
    trial: str
    lr: float
    rank: int
    steps: int
    eval_loss: Optional[float] = None
    status: str = "pending"  # pending | done | failed
    seconds: Optional[float] = None
    winner: bool = False
    error: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_list(text: str, kind: type, flag: str) -> list:
    try:
        vals = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated {'numbers' if kind is float else 'integers'}, e.g. {flag} 1e-4,2e-4") from None
    if not vals or any(v <= 0 for v in vals):
        raise ConfigError(f"{flag} {text!r}: give one or more values > 0")
    return sorted(set(vals))


def pick_winner(trials: list[Trial]) -> Optional[Trial]:
    """Lowest eval loss; within TIE (1%) of it, the smallest rank, then the lowest LR."""
    done = [t for t in trials if t.eval_loss is not None and math.isfinite(t.eval_loss)]
    if not done:
        return None
    best = min(t.eval_loss for t in done)
    tied = [t for t in done if t.eval_loss <= best * (1 + TIE)]
    return min(tied, key=lambda t: (t.rank, t.lr))


def full_run_steps(cfg: Config) -> int:
    """The optimizer steps the full run would take, computed as the recipe does."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    from ..data.batching import MicroBatchStream
    from ..data.pipeline import prepare_data
    from ..data.render import Renderer
    from ..models.load import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(cfg.model.name), cfg.model.trust_remote_code)
    data = prepare_data(cfg, Renderer.from_config(tok, cfg))
    stream = MicroBatchStream([len(e) for e in data.train], cfg.train.batch_size, cfg.train.seed, cfg.train.length_grouping)
    return max(1, math.ceil(cfg.train.epochs * stream.per_epoch / cfg.train.grad_accum))


def trial_config(cfg: Config, lr: float, rank: int, steps: int, out: Path) -> Config:
    alpha = None if cfg.lora.alpha is None else cfg.lora.alpha / cfg.lora.rank * rank  # keep alpha/rank
    train = dataclasses.replace(cfg.train, lr=lr, max_steps=steps, eval_every=max(1, steps // 4), save_every=steps, keep_checkpoints=1,
                                early_stopping=dataclasses.replace(cfg.train.early_stopping, enabled=False))
    return dataclasses.replace(cfg, name=out.name, output_dir=str(out), train=train, lora=dataclasses.replace(cfg.lora, rank=rank, alpha=alpha),
                               data=dataclasses.replace(cfg.data, audit="off"), doctor=dataclasses.replace(cfg.doctor, enabled=False))


def _trial_id(lr: float, rank: int) -> str:
    return f"lr{lr:g}-r{rank}"


def _key(cfg: Config) -> str:
    return hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()[:16]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def plan_jobs(n: int, per_trial_bytes: Optional[int], cores: Optional[int] = None, memory: Optional[int] = None) -> tuple[int, int]:
    """(parallel trials, threads each): as many as cores and memory allow, threads split."""
    import psutil

    cores = cores or _cores()
    memory = memory or int(psutil.virtual_memory().available * 0.8)
    jobs = max(1, min(n, cores, memory // per_trial_bytes if per_trial_bytes else cores))
    return jobs, max(1, cores // jobs)


def _table(trials: list[Trial]) -> str:
    lines = [f"{'trial':16} {'lr':>8} {'rank':>5} {'steps':>6} {'eval loss':>10} {'status':>8} {'secs':>6}"]
    for t in sorted(trials, key=lambda t: (t.rank, t.lr)):
        ev = f"{t.eval_loss:.4f}" if t.eval_loss is not None else "-"
        secs = f"{t.seconds:.0f}" if t.seconds is not None else "-"
        lines.append(f"{t.trial:16} {t.lr:>8g} {t.rank:>5} {t.steps:>6} {ev:>10} {t.status:>8} {secs:>6}" + ("  <- winner" if t.winner else ""))
    return "\n".join(lines)


def run_sweep(cfg: Config, lrs: list[float], ranks: list[int], budget: float = 0.25, out: Optional[Path] = None,
              jobs: Optional[int] = None, then_train: bool = False, echo: Any = print, overrides: list[str] | tuple = ()) -> tuple[list[Trial], Optional[Trial], Path]:
    if not 0 < budget <= 1:
        raise ConfigError(f"--budget {budget}: a fraction of the full run's steps in (0, 1]")
    if not cfg.has_eval:
        raise ConfigError("sweep: the trials are compared on eval loss; set data.eval or data.eval_fraction (e.g. --set data.eval_fraction=0.1)")
    if cfg.method == "full" and len(ranks) > 1:
        raise ConfigError("sweep: method full has no LoRA rank; give one --rank value")
    sweep_dir = Path(out) if out else cfg.run_dir.with_name(cfg.run_dir.name + "-sweep")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    full = full_run_steps(cfg)
    steps = max(1, math.ceil(budget * full))
    atomic_write_text(sweep_dir / "config.yaml", dump_yaml(cfg))
    atomic_write_json(sweep_dir / "overrides.json", list(overrides))
    echo(f"sweep: {len(lrs)} lr x {len(ranks)} rank = {len(lrs) * len(ranks)} trials of {steps} steps ({budget:g} x {full}) -> {sweep_dir}")

    trials, pending = [], []
    for rank in ranks:
        for lr in lrs:
            tid = _trial_id(lr, rank)
            tdir = sweep_dir / "trials" / tid
            tcfg = trial_config(cfg, lr, rank, steps, tdir)
            t = Trial(tid, lr, rank, steps)
            res = _read_result(tdir, _key(tcfg))
            if res is not None:
                t.eval_loss, t.seconds, t.status = res["eval_loss"], res.get("seconds"), "done"
            else:
                pending.append((t, tcfg, tdir))
            trials.append(t)
    if len(pending) < len(trials):
        echo(f"sweep: {len(trials) - len(pending)} finished trial(s) reused, {len(pending)} to run")

    if pending:
        from .doctor import build_context

        ctx = build_context(trial_config(cfg, lrs[0], max(ranks), steps, sweep_dir), load_data=False)
        per_trial = ctx.estimates[cfg.method].total if ctx.estimates else None
        n_jobs, threads = plan_jobs(len(pending), per_trial)
        if jobs:
            n_jobs, threads = jobs, max(1, _cores() // jobs)
        echo(f"sweep: {n_jobs} trial(s) at a time, {threads} thread(s) each")
        _run_pending(pending, n_jobs, threads, trials, sweep_dir, echo)

    winner = pick_winner(trials)
    for t in trials:
        t.winner = t is winner
    atomic_write_jsonl(sweep_dir / "sweep.jsonl", [t.to_dict() for t in trials])
    echo(_table(trials))
    if winner is None:
        echo("sweep: no trial finished; nothing to pick")
    else:
        echo(f"sweep: winner lr {winner.lr:g}, rank {winner.rank} (eval loss {winner.eval_loss:.4f}; ties within {TIE:.0%} go to the smaller rank, then the lower lr)")
    from ..report import write_report

    echo(f"report: {write_report(sweep_dir)}")
    if then_train and winner is not None:
        from .run import train_checked

        final = dataclasses.replace(cfg, output_dir=str(sweep_dir / "final"), train=dataclasses.replace(cfg.train, lr=winner.lr),
                                    lora=dataclasses.replace(cfg.lora, rank=winner.rank,
                                                             alpha=None if cfg.lora.alpha is None else cfg.lora.alpha / cfg.lora.rank * winner.rank))
        echo(f"sweep: full run with the winner -> {final.run_dir}")
        train_checked(final, list(overrides) + [f"train.lr={winner.lr:g}", f"lora.rank={winner.rank}"])
        echo(f"report: {write_report(sweep_dir)}")
    return trials, winner, sweep_dir


def _read_result(tdir: Path, key: str) -> Optional[dict]:
    try:
        res = json.loads((tdir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return res if res.get("key") == key and res.get("eval_loss") is not None else None


def _run_pending(pending: list, n_jobs: int, threads: int, trials: list[Trial], sweep_dir: Path, echo: Any) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TUNELAB_THREADS=str(threads))
    queue = list(pending)
    running: list[tuple[Trial, Path, subprocess.Popen, float, Any]] = []
    while queue or running:
        while queue and len(running) < n_jobs:
            t, tcfg, tdir = queue.pop(0)
            tdir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(tdir / "trial.yaml", dump_yaml(tcfg))
            log = open(tdir / "trial.log", "w")
            p = subprocess.Popen([sys.executable, "-m", "tunelab.plan.trial", str(tdir / "trial.yaml"), _key(tcfg)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((t, tdir, p, time.perf_counter(), log))
            echo(f"  trial {t.trial}: started")
        time.sleep(0.2)
        for item in list(running):
            t, tdir, p, t0, log = item
            if p.poll() is None:
                continue
            running.remove(item)
            log.close()
            try:
                res = json.loads((tdir / "result.json").read_text())
            except (OSError, ValueError):
                res = None
            if p.returncode == 0 and res and res.get("eval_loss") is not None:
                t.eval_loss, t.seconds, t.status = res["eval_loss"], res.get("seconds"), "done"
                echo(f"  trial {t.trial}: eval loss {t.eval_loss:.4f} ({t.seconds:.0f} s)")
            else:
                tail = (tdir / "trial.log").read_text().strip().splitlines()[-1:] if (tdir / "trial.log").exists() else []
                t.status, t.error = "failed", (tail[0] if tail else f"exit {p.returncode}")[:300]
                echo(f"  trial {t.trial}: failed: {t.error} (log: {tdir / 'trial.log'})")
            atomic_write_jsonl(sweep_dir / "sweep.jsonl", [x.to_dict() for x in trials])
