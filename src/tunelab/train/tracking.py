"""Experiment trackers through accelerate's tracker classes: ``report_to: [tensorboard, wandb,
mlflow]`` (none by default).

The reporter (``reporting.py``) owns them, so they log exactly what metrics.jsonl gets, only on
the main process (other ranks get the null reporter): every train/eval metrics row at its
step, the resolved config as hyperparameters at the start, and the tables the run prints
(parameters, and any final eval table) at the end. Where they write:

* tensorboard: ``<run>/tracking/<run name>`` (event files; ``tensorboard --logdir <run>/tracking``);
* mlflow: ``MLFLOW_TRACKING_URI`` if set, else a local file store in ``<run>/mlruns`` (MLflow 3
  wants ``MLFLOW_ALLOW_FILE_STORE=true`` for it, which tunelab then sets);
  experiment ``MLFLOW_EXPERIMENT_NAME`` or ``tunelab``, run name = the run's name;
* wandb: project ``WANDB_PROJECT`` or ``tunelab``, run name = the run's name (``WANDB_MODE=offline``
  works without a network).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import Config, ConfigError, to_dict

# tracker -> (module that must import, the tunelab extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_trackers(names: Sequence[str]) -> None:
    """Fail before any work when a tracker's package is missing, naming the extra."""
    for name in names:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"report_to: {name} needs the {module} package, which is not installed: pip install 'tunelab[{extra}]'")


def flat_hparams(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` -> bool/int/float/str (what trackers accept)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (bool, int, float, str)):
            out[prefix] = v
        else:  # None, lists (datasets, targets): as text
            out[prefix] = json.dumps(v, default=str)

    walk("", to_dict(cfg))
    return out


class Trackers:
    """accelerate trackers for one run; ``log``/``table``/``finish`` forward to each."""

    def __init__(self, cfg: Config, run_dir: Path):
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        check_trackers(cfg.report_to)
        self.trackers: list[Any] = []
        hparams = flat_hparams(cfg)
        for name in dict.fromkeys(cfg.report_to):
            if name == "tensorboard":
                t = TensorBoardTracker(cfg.name, str(run_dir / "tracking"))
            elif name == "mlflow":
                import mlflow

                if not os.environ.get("MLFLOW_TRACKING_URI"):
                    # MLflow 3 keeps its file store in maintenance mode behind this opt-in; it is
                    # the store that needs no server and no database (mlflow-skinny suffices)
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                    mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
                t = MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunelab"), run_name=cfg.name)
            else:
                t = WandBTracker(os.environ.get("WANDB_PROJECT", "tunelab"), name=cfg.name)
            t.start()
            t.store_init_configuration(hparams)
            self.trackers.append(t)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row: its numbers, under ``<event>/<key>`` (train/loss, eval/loss...), at its step."""
        event, step = row.get("event") or "run", row.get("step")
        values = {f"{event}/{k}": v for k, v in row.items()
                  if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            for t in self.trackers:
                t.log(values, step=step)

    def table(self, title: str, rows: list[tuple], headers: Sequence[str]) -> None:
        data = [[str(x) for x in r] for r in rows]
        for t in self.trackers:
            if t.name == "wandb":
                t.log_table(title, columns=list(headers), data=data)
            elif t.name == "mlflow":
                import mlflow

                mlflow.log_dict({"columns": list(headers), "data": data}, f"tables/{title}.json")
            else:  # tensorboard: a markdown table as text
                md = "| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n" + "".join("| " + " | ".join(r) + " |\n" for r in data)
                t.writer.add_text(f"tables/{title}", md)
                t.writer.flush()

    def final(self, values: dict[str, Any]) -> None:
        """The run's outcome: logged as final/<key> and as a table named final."""
        values = {k: v for k, v in values.items() if v is not None}
        nums = {f"final/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.trackers:
            if nums:
                t.log(nums, step=values.get("steps"))
        self.table("final", [(k, v) for k, v in values.items()], ("key", "value"))

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []


def open_trackers(cfg: Optional[Config], run_dir: Path) -> Optional[Trackers]:
    return Trackers(cfg, run_dir) if cfg is not None and cfg.report_to else None
