"""Early stopping ends training once the eval loss stops improving and keeps the best step.

The eval set conflicts with the training set (same prompts, other answers): the eval loss
first falls while the model learns the shared format and the end-of-turn token, then rises
as it learns the training answers. runs/NAME/adapter must hold the weights of the best eval.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from tinymodels import make_learnable_llama, write_jsonl
from tunelab.config import config_from_dict
from tunelab.data.pipeline import prepare_data
from tunelab.data.render import IGNORE
from tunelab.infer.generate import load_for_inference
from tunelab.train.recipe import train

CPU = torch.device("cpu")
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]






@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer) -> tuple[str, Path, Path]:
    d = tmp_path_factory.mktemp("es")
    model_dir = make_learnable_llama(d / "model", tokenizer)
    tr = write_jsonl(d / "train.jsonl", [{"instruction": f"Repeat the word: {w}", "output": w} for w in WORDS])
    ev = write_jsonl(d / "eval.jsonl", [{"instruction": f"Repeat the word: {w}", "output": WORDS[(i + 1) % 8]} for i, w in enumerate(WORDS)])
    return model_dir, tr, ev


def _cfg(setup, out: Path, **train_kw) -> object:
    model_dir, tr, ev = setup
    return config_from_dict({
        "name": out.name, "output_dir": str(out),
        "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(tr)}], "eval": {"path": str(ev)}, "audit": "off"},
        "lora": {"rank": 8, "targets": "all-linear", "dropout": 0.0},
        "train": {"max_steps": 100, "batch_size": 8, "lr": 1e-2, "warmup": 0.05, "seed": 0, "eval_every": 5,
                  "keep_checkpoints": 100, **train_kw},
    })


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights under the adapter file's key names."""
    w = load_file(str(run_dir / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors"))
    return {k.replace(".default.", "."): v for k, v in w.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def _eval_loss_of_saved_adapter(cfg) -> float:
    """The eval loss recomputed from runs/NAME/adapter alone (full logits, token mean)."""
    loaded = load_for_inference(str(cfg.run_dir), device=CPU)
    examples = prepare_data(cfg, loaded.renderer).eval
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = loaded.model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
            labels = torch.tensor(ex.labels[1:])
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            n += int((labels != IGNORE).sum())
    return total / n


def test_early_stopping_stops_and_keeps_the_best_step(tmp_path, setup):
    cfg = _cfg(setup, tmp_path / "es", early_stopping={"patience": 2})
    res = train(cfg, console=Console(file=io.StringIO()))

    assert res.stopped_early
    assert res.steps < 100
    rows = _metrics(cfg.run_dir)
    assert max(r["step"] for r in rows) == res.steps, "nothing trained after the stop"
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["event"] == "eval"]
    assert evals[0][0] == 0  # the base model's eval loss is logged before training
    trained_evals = evals[1:]
    assert [s for s, _ in trained_evals] == list(range(5, res.steps + 1, 5))
    assert [(s, pytest.approx(e, abs=1e-9)) for s, e in res.eval_losses] == trained_evals
    best_step, best = min(trained_evals, key=lambda x: x[1])
    # the eval loss first fell, then rose for `patience` evals in a row, and training stopped
    assert best < evals[0][1]
    assert res.best_step == best_step < res.steps
    assert res.best_eval == pytest.approx(best, abs=1e-9)
    after = [e for s, e in trained_evals if s > best_step]
    assert len(after) == 2 and all(e >= best for e in after)

    # runs/NAME/adapter holds the weights of the best step, not the last ones
    adapter = _adapter_weights(cfg.run_dir / "adapter")
    assert _same(adapter, _checkpoint_weights(cfg.run_dir, best_step))
    assert not _same(adapter, _checkpoint_weights(cfg.run_dir, res.steps))
    assert any(torch.count_nonzero(v) > 0 for k, v in adapter.items() if "lora_B" in k)
    # ... and recomputing the eval loss from the saved adapter gives the best eval loss
    assert _eval_loss_of_saved_adapter(cfg) == pytest.approx(best, abs=1e-5)


def test_without_early_stopping_the_run_goes_on_and_keeps_the_best(tmp_path, setup):
    cfg = _cfg(setup, tmp_path / "no-es", max_steps=30, early_stopping={"enabled": False, "patience": 1})
    res = train(cfg, console=Console(file=io.StringIO()))
    assert not res.stopped_early and res.steps == 30
    evals = [(r["step"], r["eval_loss"]) for r in _metrics(cfg.run_dir) if r["event"] == "eval"]
    assert [s for s, _ in evals] == [5, 10, 15, 20, 25, 30]  # no step-0 eval without early stopping
    best_step, best = min(evals, key=lambda x: x[1])
    assert res.best_step == best_step < 30 and math.isclose(res.best_eval, best)
    assert _same(_adapter_weights(cfg.run_dir / "adapter"), _checkpoint_weights(cfg.run_dir, best_step))


def test_resuming_an_early_stopped_run_trains_no_further(tmp_path, setup):
    cfg = _cfg(setup, tmp_path / "es-resume", early_stopping={"patience": 2})
    first = train(cfg, console=Console(file=io.StringIO()))
    assert first.stopped_early
    adapter = _adapter_weights(cfg.run_dir / "adapter")
    metrics = (cfg.run_dir / "metrics.jsonl").read_text()
    again = train(cfg, resume=True, console=Console(file=io.StringIO()))
    assert again.stopped_early and again.steps == first.steps and again.losses == []
    assert again.best_step == first.best_step and again.best_eval == pytest.approx(first.best_eval)
    assert (cfg.run_dir / "metrics.jsonl").read_text() == metrics
    assert _same(_adapter_weights(cfg.run_dir / "adapter"), adapter)
