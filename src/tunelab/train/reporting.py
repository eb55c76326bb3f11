"""Console, progress bar and metrics file. Non-main processes get the null object, so the
recipe never branches on the rank."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..files import atomic_write_text

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


class Reporter:
    """What the main process shows and writes."""

    def __init__(self, run_dir: Path, console: Optional[Console] = None, resume_step: Optional[int] = None):
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

    def _truncate_metrics(self, step: int) -> None:
        """On resume, keep the lines up to the checkpoint's step: the rest is replayed."""
        keep = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= step:
                    keep.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    def info(self, msg: Any) -> None:
        self.console.print(msg)

    def warn(self, msg: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {msg}")

    def table(self, title: str, rows: list[tuple], headers: tuple[str, ...]) -> None:
        t = Table(title=title, title_justify="left")
        for h in headers:
            t.add_column(h)
        for r in rows:
            t.add_row(*[str(x) for x in r])
        self.console.print(t)

    def start(self, total_steps: int, first_step: int = 0) -> None:
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
        if row.get("event") == "eval" and row.get("eval_loss") is not None:
            if self._progress is not None:
                self._progress.update(self._task, eval=f"{row['eval_loss']:.4f}")
            if self.console.is_terminal:  # above the live bar, as it happens
                self.console.print(f"  step {row['step']}  eval_loss {row['eval_loss']:.4g}", highlight=False)
        if not self.console.is_terminal and row.get("event") in ("train", "eval"):
            # No live bar (CI, pipes): one plain line per logged event.
            parts = [f"step {row['step']}"]
            for k in ("train_loss", "eval_loss", "lr", "tokens_per_s"):
                if row.get(k) is not None:
                    parts.append(f"{k} {row[k]:.4g}")
            self.console.print("  " + "  ".join(parts), highlight=False)

    def finding(self, f: Any) -> None:
        """A diagnosis finding (train/diagnosis.py): printed once, and an event in metrics.jsonl."""
        self.console.print(f"[yellow]diagnosis:[/yellow] {f.text()}", highlight=False)
        self.metrics(**f.event())

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class NullReporter(Reporter):
    """Does nothing: for processes other than the main one."""

    def __init__(self, *a: Any, **k: Any):
        pass

    def info(self, msg: Any) -> None: ...
    def warn(self, msg: str) -> None: ...
    def table(self, *a: Any, **k: Any) -> None: ...
    def start(self, *a: Any, **k: Any) -> None: ...
    def step(self, *a: Any, **k: Any) -> None: ...
    def metrics(self, **values: Any) -> None: ...
    def finding(self, f: Any) -> None: ...
    def close(self) -> None: ...


def make_reporter(is_main: bool, run_dir: Path, console: Optional[Console] = None, resume_step: Optional[int] = None) -> Reporter:
    return Reporter(run_dir, console, resume_step) if is_main else NullReporter()
