"""Loss guards, disk faults and signals: a bad batch, a full disk or a Ctrl-C never corrupts a
run; each stops (or skips) with one line and leaves a resumable run."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tinymodels import write_jsonl
from tunelab.config import config_from_dict
from tunelab.train import checkpoint as ckpt_mod
from tunelab.train import loss as loss_mod
from tunelab.train import recipe
from tunelab.train.checkpoint import latest_checkpoint, list_checkpoints
from tunelab.train.guards import CheckpointWriteError, Interrupted, NonFiniteError, drop_untrained
from tunelab.train.recipe import train

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("guard-data")
    return write_jsonl(d / "train.jsonl", [{"instruction": f"Name number {i}.", "output": f"number {i} " * (1 + i % 3)} for i in range(8)])


def _cfg(model_dir: str, data: Path, out: Path, **train_kw):
    return config_from_dict({
        "output_dir": str(out), "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "audit": "off"}, "lora": {"rank": 4, "dropout": 0.0},
        "train": {"max_steps": STEPS, "batch_size": 2, "lr": 1e-3, "save_every": 1, "seed": 3, **train_kw},
    })


def _quiet() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=400), buf


def _poison_forward(monkeypatch, calls: set[int], where: str = "loss") -> None:
    """Make the loss (or only its gradient) non-finite on the given forward calls (1-based)."""
    real = loss_mod.CausalLMLoss.forward
    n = {"i": 0}

    def forward(self, *a, **k):
        loss, extra = real(self, *a, **k)
        n["i"] += 1
        if n["i"] in calls:
            if where == "loss":
                loss = loss * float("nan")
            else:
                loss.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient
        return loss, extra

    monkeypatch.setattr(loss_mod.CausalLMLoss, "forward", forward)


def _rows(run: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_stops_naming_step_and_records_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, data, monkeypatch, where):
    out = tmp_path / "run"
    _poison_forward(monkeypatch, {3}, where)
    with pytest.raises(NonFiniteError) as e:
        train(_cfg(tiny_model_dir, data, out), console=_quiet()[0])
    msg = str(e.value)
    assert "step 3" in msg and f"{data}:" in msg and ("loss nan" in msg if where == "loss" else "gradient norm" in msg), msg
    assert "step-0000002" in msg
    assert latest_checkpoint(out / "checkpoints").name == "step-0000002"
    weights = ckpt_mod.load_file(str(out / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    monkeypatch.undo()
    res = train(_cfg(tiny_model_dir, data, out), resume=True, console=_quiet()[0])  # the run goes on from the good checkpoint
    assert res.steps == STEPS and all(map(lambda x: x == x, res.losses))


def test_skip_batch_skips_counts_and_stops_past_the_cap(tmp_path, tiny_model_dir, data, monkeypatch):
    _poison_forward(monkeypatch, {2, 4})
    console, buf = _quiet()
    res = train(_cfg(tiny_model_dir, data, tmp_path / "a", on_nonfinite="skip_batch", max_skipped_batches=5), console=console)
    assert res.steps == STEPS and all(l == l for l in res.losses)
    skips = _rows(tmp_path / "a", "skip")
    assert [s["step"] for s in skips] == [2, 3] and all(s["records"] for s in skips)  # forward 4 was step 3's retry
    assert [r["step"] for r in _rows(tmp_path / "a", "train")] == list(range(1, STEPS + 1))
    assert "2 non-finite batches skipped" in buf.getvalue()

    monkeypatch.undo()
    _poison_forward(monkeypatch, {2, 4})
    with pytest.raises(NonFiniteError, match=r"step 3 \(1 batches already skipped, train.max_skipped_batches=1\)"):
        train(_cfg(tiny_model_dir, data, tmp_path / "b", on_nonfinite="skip_batch", max_skipped_batches=1), console=_quiet()[0])


def test_micro_batches_without_trained_tokens_are_skipped_and_counted(tmp_path, tiny_model_dir, data, monkeypatch):
    class B:
        def __init__(self, n):
            self.n_trained = n

    kept, dropped = drop_untrained([B(3), B(0), B(1), B(0)])
    assert [b.n_trained for b in kept] == [3, 1] and dropped == 2

    real_collate = recipe.collate
    n = {"i": 0}

    def collate(examples, pad_id, *a, **k):
        b = real_collate(examples, pad_id, *a, **k)
        n["i"] += 1
        if n["i"] == 2:
            b.labels[:] = -100  # this micro-batch trains nothing (every completion truncated away)
        return b

    monkeypatch.setattr(recipe, "collate", collate)
    console, buf = _quiet()
    res = train(_cfg(tiny_model_dir, data, tmp_path / "run", grad_accum=2), console=console)
    assert res.steps == STEPS and all(l == l and l > 0 for l in res.losses)  # never 0/0 = nan, never a 0 averaged in
    assert "1 passes without trained tokens skipped" in buf.getvalue()


def test_full_disk_while_checkpointing_is_a_clear_error_and_the_previous_checkpoint_resumes(tmp_path, tiny_model_dir, data, monkeypatch):
    out = tmp_path / "run"
    real_save = ckpt_mod.save_file
    n = {"i": 0}

    def full_disk(tensors, filename, *a, **k):  # the fault-injecting writer: half a file, then ENOSPC
        n["i"] += 1
        if n["i"] == 3:
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    with pytest.raises(CheckpointWriteError) as e:
        train(_cfg(tiny_model_dir, data, out), console=_quiet()[0])
    msg = str(e.value)
    assert "step 3" in msg and "No space left on device" in msg and "step-0000002 is intact" in msg and "--resume" in msg, msg
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000001", "step-0000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # the half write is gone
    monkeypatch.undo()
    res = train(_cfg(tiny_model_dir, data, out), resume=True, console=_quiet()[0])
    assert res.steps == STEPS


def test_low_free_space_is_warned_before_the_run(tmp_path, tiny_model_dir, data, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    console, buf = _quiet()
    train(_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=1), console=console)
    assert "MB free but the run's checkpoints need about" in buf.getvalue()


def test_sigterm_mid_step_checkpoints_at_that_step_boundary(tmp_path, tiny_model_dir, data, monkeypatch):
    real = loss_mod.CausalLMLoss.forward
    n = {"i": 0}

    def forward(self, *a, **k):
        n["i"] += 1
        if n["i"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of step 3
        return real(self, *a, **k)

    monkeypatch.setattr(loss_mod.CausalLMLoss, "forward", forward)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 3 of 6") as e:
        train(_cfg(tiny_model_dir, data, tmp_path / "run", save_every=100), console=_quiet()[0])
    assert e.value.step == 3 and e.value.exit_code == 130
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-0000003"  # step 3 finished, then saved
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    monkeypatch.undo()
    assert train(_cfg(tiny_model_dir, data, tmp_path / "run", save_every=100), resume=True, console=_quiet()[0]).steps == STEPS


def test_ctrl_c_checkpoints_at_the_step_boundary_and_exits_with_one_line(tmp_path, tiny_model_dir, data):
    sig = signal.SIGINT
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  name: {tiny_model_dir}\n  dtype: fp32\ndata:\n  train:\n    - path: {data}\n"
                   "  audit: off\ntrain:\n  max_steps: 100000\n  batch_size: 2\n  save_every: 1000\n")
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.lstrip().startswith("step 3"):
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err + out
    last = [x for x in err.splitlines() if x.startswith("tunelab:")]
    assert len(last) == 1, err
    assert f"stopped by {sig.name} at step" in last[0] and f"resume with: tunelab train {cfg} --resume" in last[0]
    step = int(last[0].split(" at step ")[1].split()[0])
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == f"step-{step:07d}"  # the step boundary, not save_every
    assert not (tmp_path / "run" / "train.lock").exists()
