"""Console, progress bar and metrics file. Non-main processes get the null object, so the
recipe never branches on the rank."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..files import atomic_write_text
from .tracking import check_trackers, open_trackers

METRIC_KEYS = ("step", "epoch", "lr", "train_loss", "eval_loss", "trained_tokens", "tokens_per_s")


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    out = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["peak_gpu_allocated"] = torch.cuda.max_memory_allocated(device)
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def format_duration(seconds: float) -> str:
    """``0:04:10`` (h:mm:ss)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Reporter:
    """What the main process shows and writes."""

    def __init__(self, run_dir: Path, console: Optional[Console] = None, resume_step: Optional[int] = None, cfg: Any = None):
        self.console = console or Console(stderr=False)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_step is None:
            self.metrics_path.write_text("")
        else:
            self._truncate_metrics(resume_step)
        self._progress: Optional[Progress] = None
        self._task = None
        self.trackers = open_trackers(cfg, self.run_dir)  # report_to: accelerate's trackers, or None
        self._total: Optional[int] = None  # steps of the run, once started
        self._first = 0
        self._t0 = time.perf_counter()

    def _truncate_metrics(self, step: int) -> None:
        """On resume, keep the lines up to the checkpoint's step: the rest is replayed."""
        keep = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill: its step is replayed anyway
                if isinstance(row, dict) and (row.get("step") or 0) <= step:
                    keep.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    def info(self, msg: Any) -> None:
        self.console.print(msg)

    def line(self, msg: str) -> None:
        """Plain text: no markup, no highlighting (paths and brackets print as they are)."""
        self.console.print(msg, markup=False, highlight=False, soft_wrap=True)

    def warn(self, msg: str) -> None:
        from rich.text import Text

        self.console.print(Text.assemble(("warning: ", "yellow"), msg), soft_wrap=True)

    def table(self, title: str, rows: list[tuple], headers: tuple[str, ...]) -> None:
        t = Table(title=title, title_justify="left")
        for h in headers:
            t.add_column(h)
        for r in rows:
            t.add_row(*[str(x) for x in r])
        self.console.print(t)
        if self.trackers:
            self.trackers.table(title, rows, headers)

    def start(self, total_steps: int, first_step: int = 0) -> None:
        self._total, self._first, self._t0 = total_steps, first_step, time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("eval {task.fields[eval]}"), TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            disable=not self.console.is_terminal,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=first_step, loss="-", eval="-", lr="-", tps="-")

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tokens_per_s:.0f}")

    def metrics(self, **values: Any) -> None:
        row = {k: values.get(k) for k in METRIC_KEYS}
        row.update({k: v for k, v in values.items() if k not in row})
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = None
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.trackers:
            self.trackers.log(row)
        if row.get("event") == "eval" and row.get("eval_loss") is not None and self._progress is not None:
            self._progress.update(self._task, eval=f"{row['eval_loss']:.4f}")  # the live bar shows the latest eval loss
        if row.get("event") == "eval" or (not self.console.is_terminal and row.get("event") == "train"):
            # No live bar (CI, pipes): one plain line per logged event; evals always (the bar shows no eval).
            self.console.print(self.plain_line(row), highlight=False, markup=False, soft_wrap=True)

    def plain_line(self, row: dict) -> str:
        """``step 12/126  train_loss 1.234  lr 2e-04  412 tok/s  elapsed 0:01:02  eta 0:04:10``."""
        step = row["step"]
        parts = [f"step {step}/{self._total}" if self._total else f"step {step}"]
        if row.get("event") == "eval":
            parts.append(f"eval_loss {row['eval_loss']:.4f}" if row.get("eval_loss") is not None else "eval_loss nan")
        else:
            if row.get("train_loss") is not None:
                parts.append(f"train_loss {row['train_loss']:.4f}")
            if row.get("lr") is not None:
                parts.append(f"lr {row['lr']:.2e}")
            if row.get("tokens_per_s") is not None:
                parts.append(f"{row['tokens_per_s']:.0f} tok/s")
        if self._total:
            elapsed = time.perf_counter() - self._t0
            done = step - self._first
            parts.append(f"elapsed {format_duration(elapsed)}")
            if done > 0 and row.get("event") == "train":
                parts.append(f"eta {format_duration(elapsed / done * max(self._total - step, 0))}")
        return "  " + "  ".join(parts)

    def finding(self, f: Any) -> None:
        """A diagnosis finding (train/diagnosis.py): printed once, and an event in metrics.jsonl."""
        self.console.print(f"[yellow]diagnosis:[/yellow] {f.text()}", highlight=False)
        self.metrics(**f.event())

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def final(self, **values: Any) -> None:
        """The run's outcome, for the trackers (which are closed here)."""
        if self.trackers:
            self.trackers.final(values)
            self.trackers.finish()


class NullReporter(Reporter):
    """Does nothing: for processes other than the main one."""

    def __init__(self, *a: Any, **k: Any):
        pass

    def info(self, msg: Any) -> None: ...
    def line(self, msg: str) -> None: ...
    def warn(self, msg: str) -> None: ...
    def table(self, *a: Any, **k: Any) -> None: ...
    def start(self, *a: Any, **k: Any) -> None: ...
    def step(self, *a: Any, **k: Any) -> None: ...
    def metrics(self, **values: Any) -> None: ...
    def finding(self, f: Any) -> None: ...
    def close(self) -> None: ...
    def final(self, **values: Any) -> None: ...


def make_reporter(is_main: bool, run_dir: Path, console: Optional[Console] = None, resume_step: Optional[int] = None, cfg: Any = None) -> Reporter:
    """The main process's reporter (with ``cfg.report_to``'s trackers), the null one elsewhere."""
    check_trackers(getattr(cfg, "report_to", ()) or ())  # every rank fails alike on a missing package
    return Reporter(run_dir, console, resume_step, cfg) if is_main else NullReporter()
