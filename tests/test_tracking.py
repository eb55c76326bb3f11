"""Experiment trackers through accelerate: report_to tensorboard / mlflow (read back for real and
compared with metrics.jsonl), the config as hyperparameters, the tables, and a clear error
naming the extra when a tracker's package is missing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tinymodels import write_jsonl
from tunelab.config import ConfigError, config_from_dict
from tunelab.train import tracking
from tunelab.train.recipe import train


def _cfg(tmp_path: Path, model_dir: str, report_to: list[str]) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Name a number after {i}.", "output": str(i + 1)} for i in range(12)])
    return {
        "name": "tracked", "output_dir": str(tmp_path / "run"), "report_to": report_to,
        "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "eval_fraction": 0.25, "audit": "off"},
        "lora": {"rank": 4, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 3, "lr": 1e-2, "warmup": 0.0, "eval_every": 2},
    }


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_tensorboard_and_mlflow_match_metrics_jsonl(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config_from_dict(_cfg(tmp_path, tiny_model_dir, ["tensorboard", "mlflow"]))
    train(cfg, console=Console(file=io.StringIO()))
    run = tmp_path / "run"
    rows = _metrics(run)
    want = {(ev, k): [(r["step"], r[k]) for r in rows if r["event"] == ev]
            for ev, k in (("train", "train_loss"), ("train", "lr"), ("eval", "eval_loss"))}
    assert len(want["train", "train_loss"]) == 4 and len(want["eval", "eval_loss"]) >= 2

    # --- TensorBoard: the event files, read back
    (tb_dir,) = [p for p in (run / "tracking").iterdir() if p.is_dir()]
    assert tb_dir.name == "tracked"
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for (ev, k), pairs in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(f"{ev}/{k}")]
        assert [s for s, _ in got] == [s for s, _ in pairs]
        assert [v for _, v in got] == pytest.approx([v for _, v in pairs], rel=1e-6)  # event files hold float32
    assert acc.Scalars("final/steps")[-1].value == 4
    texts = {t for t in acc.Tags()["tensors"]}
    assert "tables/parameters/text_summary" in texts and "tables/final/text_summary" in texts
    (hparams,) = list(tb_dir.glob("*/hparams.yml"))
    hp = hparams.read_text()
    assert "lora.rank: 4" in hp and "train.max_steps: 4" in hp and "name: tracked" in hp

    # --- MLflow: the local file store in <run>/mlruns, read back with its client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "tunelab"]
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == "tracked"
    assert mrun.data.params["lora.rank"] == "4" and mrun.data.params["data.eval_fraction"] == "0.25"
    for (ev, k), pairs in want.items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, f"{ev}/{k}"))
        assert [s for s, _ in hist] == [s for s, _ in pairs]
        assert [v for _, v in hist] == pytest.approx([v for _, v in pairs], rel=1e-12)
    arts = {a.path for a in client.list_artifacts(mrun.info.run_id, "tables")}
    assert {"tables/parameters.json", "tables/final.json"} <= arts


def test_no_trackers_by_default(tmp_path, tiny_model_dir):
    cfg = config_from_dict(_cfg(tmp_path, tiny_model_dir, []))
    assert config_from_dict({}).report_to == []
    train(cfg, console=Console(file=io.StringIO()))
    assert not (tmp_path / "run" / "tracking").exists() and not (tmp_path / "run" / "mlruns").exists()


def test_missing_tracker_package_names_the_extra(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda m, *a: None if m == "mlflow" else real(m, *a))
    with pytest.raises(ConfigError, match=r"report_to: mlflow needs the mlflow package, which is not installed: pip install 'tunelab\[mlflow\]'"):
        tracking.check_trackers(["tensorboard", "mlflow"])
    with pytest.raises(ConfigError, match="is not one of"):
        config_from_dict({"report_to": ["tensorbord"]})


@pytest.mark.skipif(tracking.importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_cli_missing_wandb_is_one_clear_line(tmp_path, tiny_model_dir):
    p = tmp_path / "run.yaml"
    p.write_text(json.dumps(_cfg(tmp_path, tiny_model_dir, ["wandb"])))  # JSON is YAML
    r = subprocess.run([sys.executable, "-m", "tunelab", "train", str(p)], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "tunelab: error: report_to: wandb needs the wandb package, which is not installed: pip install 'tunelab[wandb]'"
