"""``tunelab eval RUN_OR_MODEL``: the numbers, printed as tables and optionally written as JSON.

* ``--data FILE``: the metrics on that file;
* a run dir without ``--data``: the generalization-gap table, a sample of the run's own
  training records against its held-out set (the same seeded split training used), with
  train, held-out and the gap per metric (docs/practices.md#overfit-metrics). Held-out prompts
  that also occur in training (several references per prompt, e.g. common_gen) are counted
  and named in a note: that part of the held-out side measures recall;
* ``--paraphrases FILE`` (repeatable): the memorization gap (evaluate/paraphrase.py);
* ``--retention FILE``: forgetting, base vs tuned (evaluate/retention.py).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import ConfigError
from ..data.formats import load_dataset_file
from ..data.pipeline import prepare_conversations
from ..files import atomic_write_json
from ..infer.generate import Loaded, load_for_inference
from .core import Item, items_from, score
from .metrics import parse_metrics
from .paraphrase import paraphrase_gap
from .retention import retention

LABELS = {"em": "exact match", "bleu": "BLEU", "rougeL": "ROUGE-L", "loss": "loss", "ppl": "perplexity"}


class _Bar:
    """A rich progress bar over prompts; silent when the console is not a terminal."""

    def __init__(self, console: Console):
        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, transient=True, disable=not console.is_terminal)

    def __enter__(self) -> "_Bar":
        self.p.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.p.stop()

    def task(self, label: str, total: int):
        t = self.p.add_task(label, total=total)
        return lambda n: self.p.advance(t, n)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _sample(items: list[Item], n: int, seed: int) -> list[Item]:
    return items if len(items) <= n else random.Random(seed).sample(items, n)


def _score(loaded: Loaded, items: Sequence[Item], metrics: list[str], bar: _Bar, label: str, args: Any) -> Any:
    gen = any(m != "loss" for m in metrics)
    cb = bar.task(label, len(items)) if gen else None
    max_seq_len = loaded.config.data.max_seq_len if loaded.config else 1024
    return score(loaded, items, metrics, args.max_new_tokens, args.batch_size, max_seq_len, cb)


def gap_table(train: dict, held: Optional[dict]) -> Table:
    t = Table(title="generalization gap (train sample vs held-out)", title_justify="left")
    for h in ("metric", "train", "held-out", "gap (train - held-out)"):
        t.add_column(h, justify="right" if h != "metric" else "left")
    for k, v in train.items():
        h = held.get(k) if held else None
        t.add_row(LABELS.get(k, k), _fmt(v), _fmt(h), _fmt(v - h) if h is not None else "-")
    return t


def run_eval(args: Any, console: Optional[Console] = None) -> dict:
    console = console or Console()
    metrics = parse_metrics(args.metrics)
    is_run = (Path(args.run) / "config.yaml").exists()
    if not is_run and not args.data:
        raise ConfigError(f"eval {args.run}: a model (not a run dir) needs --data FILE")
    if not is_run and (args.paraphrases or args.retention):
        raise ConfigError(f"eval {args.run}: --paraphrases and --retention need a run dir (its training data and base model)")
    loaded = load_for_inference(args.run)
    out: dict[str, Any] = {"target": args.run, "metrics": metrics}
    seed = loaded.config.train.seed if is_run else 0
    with _Bar(console) as bar:
        if args.data:
            items = _sample(items_from(load_dataset_file(args.data).conversations), args.max, seed)
            s = _score(loaded, items, metrics, bar, Path(args.data).name, args)
            out["data"] = {"file": args.data, "n": s.n, **s.metrics, "records": s.rows()}
            t = Table(title=f"{args.data} ({s.n} prompts)", title_justify="left")
            t.add_column("metric")
            t.add_column("value", justify="right")
            for k, v in s.metrics.items():
                t.add_row(LABELS.get(k, k), _fmt(v))
            console.print(t)
        elif is_run:
            train_c, eval_c, _, _ = prepare_conversations(loaded.config)
            train_items = items_from(train_c)
            seen = {json.dumps(it.prompt, sort_keys=True) for it in train_items}
            held = items_from(eval_c)
            tr = _score(loaded, _sample(train_items, args.max, seed), metrics, bar, "train sample", args)
            he = _score(loaded, _sample(held, args.max, seed), metrics, bar, "held-out", args) if held else None
            shared = sum(json.dumps(it.prompt, sort_keys=True) in seen for it in (he.items if he else []))
            out["train"] = {"n": tr.n, **tr.metrics, "records": tr.rows()}
            out["held_out"] = {"n": he.n, **he.metrics, "records": he.rows(), "prompts_also_in_train": shared} if he else None
            console.print(gap_table(tr.metrics, he.metrics if he else None))
            note = f"train sample {tr.n} prompts; held-out {he.n if he else 0} prompts"
            if shared:
                note += (f"; {shared} held-out prompts also occur in training (other references of the same prompt): "
                         "the held-out side partly measures recall; hold out whole prompts (data.eval) for a clean gap")
            if not held:
                note += " (the run has no held-out set: data.eval, or data.eval_fraction and at least 40 records)"
            console.print(note, highlight=False)
        for path in args.paraphrases or []:
            cfg = loaded.config
            originals = [c for e in cfg.data.train for c in load_dataset_file(e.path, e.format, cfg.data.on_error, e.name).conversations]
            trained = {c.source for c in prepare_conversations(cfg)[0]}
            g = paraphrase_gap(loaded, originals, trained, path, args.max, seed, args.batch_size, args.max_new_tokens,
                               bar.task(f"paraphrase {Path(path).name}", 2 * min(args.max, len(originals))))
            out.setdefault("paraphrases", []).append(g)
            flipped = g["right_on_train_wrong_on_paraphrase"]
            console.print(f"[bold]memorization gap[/bold] {Path(path).name}: exact match {g['em_train_phrasing']:.1f}% on the training "
                          f"phrasing vs {g['em_paraphrase']:.1f}% paraphrased ({g['pairs']} trained records): gap "
                          f"{g['memorization_gap']:+.1f} points; {len(flipped)} right on the training phrasing and wrong paraphrased"
                          + (":" if flipped else ""), highlight=False)
            for f in flipped[:10]:
                console.print(f"  {f['train_record']} -> {f['paraphrase_record']}: {f['on_paraphrase']!r}, expected "
                              f"{f['paraphrase_reference']!r}", highlight=False, markup=False)
            if len(flipped) > 10:
                console.print(f"  ... and {len(flipped) - 10} more (--json for all)")
    if args.retention:
        r = retention(args.run, args.retention, args.max, args.batch_size)
        out["retention"] = r
        print_retention(console, r)
    if args.json:
        atomic_write_json(args.json, out)
        console.print(f"written to {args.json}")
    return out


def print_retention(console: Console, r: dict) -> None:
    t = Table(title=f"forgetting on {Path(r['file']).name} ({r['kind']}: {r['base']['records']} records)", title_justify="left")
    for h in ("metric", "base", "tuned", "delta"):
        t.add_column(h, justify="right" if h != "metric" else "left")
    for k, d in r["delta"].items():
        t.add_row(LABELS.get(k, k), _fmt(r["base"][k]), _fmt(r["tuned"][k]), f"{d:+.4g}")
    console.print(t)


def retention_after_training(cfg: Any, console: Optional[Console] = None) -> Optional[dict]:
    """``eval.retention`` set: measure forgetting at the end of the run, into runs/NAME/retention.json."""
    if not cfg.eval.retention:
        return None
    console = console or Console()
    r = retention(str(cfg.run_dir), cfg.eval.retention, cfg.eval.retention_max)
    atomic_write_json(cfg.run_dir / "retention.json", r)
    print_retention(console, r)
    console.print(f"retention written to {cfg.run_dir / 'retention.json'}")
    return r
