"""--resume continues exactly: the loss trace after a resume equals the uninterrupted run's.

With LoRA dropout (RNG state matters), length grouping (the data order must be replayed),
gradient accumulation 2 and an eval set (early-stopping state must survive), for a resume in
the middle of epoch 1 and for one after epoch 1. Checkpoints are written atomically and read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tinymodels import write_jsonl
from tunelab.config import config_from_dict
from tunelab.models.build import build_model
from tunelab.files import atomic_dir
from tunelab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from tunelab.train.recipe import train

CPU = torch.device("cpu")
# 10 examples in micro-batches of 2: 5 micro-batches per epoch, 2 per step, so step 3 takes
# the last micro-batch of epoch 0 and the first of epoch 1. 3 epochs = 8 steps.
TOTAL_STEPS = 8




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("resume-data")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    train_rows = [{"instruction": f"Count to {i + 1} in words.", "output": " ".join(words[: i + 1])} for i in range(10)]
    eval_rows = [{"instruction": f"Spell {w}.", "output": " ".join(w)} for w in ("lambda", "mu", "nu")]
    return write_jsonl(d / "train.jsonl", train_rows), write_jsonl(d / "eval.jsonl", eval_rows)


def _cfg(model_dir: str, data: tuple[Path, Path], out: Path, save_every: int = 1) -> object:
    return config_from_dict({
        "name": out.name, "output_dir": str(out),
        "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(data[0])}], "eval": {"path": str(data[1])}, "audit": "off"},
        "lora": {"rank": 4, "targets": "all-linear", "dropout": 0.2},
        "train": {
            "epochs": 3, "batch_size": 2, "grad_accum": 2, "lr": 5e-3, "warmup": 0.1, "length_grouping": True, "seed": 11,
            "eval_every": 2, "save_every": save_every, "keep_checkpoints": 2, "early_stopping": {"enabled": True, "patience": 50},
        },
    })


def _quiet() -> Console:
    return Console(file=io.StringIO())


def _trace(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [(r["step"], r["train_loss"]) for r in rows if r["event"] == "train"]
    eval_rows = [(r["step"], r["eval_loss"]) for r in rows if r["event"] == "eval"]
    return train_rows, eval_rows


def _assert_same_trace(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (s, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-6, rel=0), f"step {s}: {a} != {b}"


def _no_temp_leftovers(run_dir: Path) -> None:
    for d in (run_dir, run_dir / "checkpoints"):
        hidden = [p.name for p in d.iterdir() if p.name.startswith(".")]
        assert not hidden, f"temp files or dirs left in {d}: {hidden}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = train(_cfg(tiny_model_dir, data, out), console=_quiet())
    assert res.steps == TOTAL_STEPS and not res.stopped_early
    return out, res


@pytest.mark.parametrize(
    "stop_at, save_every",
    [
        (1, 1),  # mid epoch 0 (2 of 5 micro-batches done)
        (3, 1),  # just after epoch 0 ends, the step straddling the epoch boundary done
        (3, 2),  # interrupted after step 3 but last saved at 2: step 3 is replayed
    ],
    ids=["mid-epoch", "after-epoch-1", "replay-unsaved-step"],
)
def test_resume_reproduces_the_uninterrupted_trace(tmp_path, tiny_model_dir, data, reference, stop_at, save_every, monkeypatch):
    ref_dir, ref_res = reference
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, data, out, save_every)
    first = train(cfg, stop_at_step=stop_at, console=_quiet())
    assert first.steps == stop_at and not first.stopped_early
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None and saved.name == f"step-{stop_at - stop_at % save_every:07d}"

    # resume: every torch.load must be weights_only=True
    real_load = torch.load
    calls = []

    def checked_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    second = train(cfg, resume=True, console=_quiet())
    monkeypatch.undo()
    assert calls and all(w is True for w in calls), calls
    assert second.steps == TOTAL_STEPS

    ref_train, ref_eval = _trace(ref_dir)
    got_train, got_eval = _trace(out)
    assert len(ref_train) == TOTAL_STEPS
    _assert_same_trace(got_train, ref_train)
    _assert_same_trace(got_eval, ref_eval)
    assert second.best_step == ref_res.best_step
    assert second.best_eval == pytest.approx(ref_res.best_eval, abs=1e-6)

    # the results are the same weights too
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

    # atomic writes leave no temp dirs; only keep_checkpoints complete checkpoints remain
    _no_temp_leftovers(out)
    cks = list_checkpoints(out / "checkpoints")
    saved_steps = sorted({s for s in range(1, TOTAL_STEPS + 1) if s % save_every == 0} | {TOTAL_STEPS})
    assert [p.name for p in cks] == [f"step-{s:07d}" for s in saved_steps[-2:]]
    for ck in cks:
        assert {p.name for p in ck.iterdir()} == {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}
        assert json.loads((ck / "state.json").read_text())["step"] == int(ck.name.split("-")[1])


def test_reference_run_leaves_no_temp_dirs(reference):
    ref_dir, _ = reference
    _no_temp_leftovers(ref_dir)
    assert (ref_dir / "adapter" / "adapter_model.safetensors").exists()


def test_resume_without_a_checkpoint_fails(tmp_path, tiny_model_dir, data):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(_cfg(tiny_model_dir, data, tmp_path / "fresh"), resume=True, console=_quiet())


def test_checkpoint_from_another_adapter_layout_is_refused(tiny_model_dir, data, reference):
    """A checkpoint must cover exactly the model's trainable parameters, in both directions."""
    ref_dir, _ = reference
    ck = latest_checkpoint(ref_dir / "checkpoints")
    for targets in ("qv", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]):
        cfg = _cfg(tiny_model_dir, data, ref_dir)
        cfg.lora.targets = targets
        model = build_model(cfg, CPU).model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        with pytest.raises(ValueError, match="config"):
            load_checkpoint(ck, model, opt, sched)


def test_atomic_dir_failure_leaves_the_old_result_and_no_temp(tmp_path):
    final = tmp_path / "adapter"
    atomic_dir(final, lambda d: (d / "w.txt").write_text("v1"))
    assert (final / "w.txt").read_text() == "v1"

    def broken(d: Path) -> None:
        (d / "w.txt").write_text("half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_dir(final, broken)
    assert (final / "w.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    atomic_dir(final, lambda d: (d / "w.txt").write_text("v2"))
    assert (final / "w.txt").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
