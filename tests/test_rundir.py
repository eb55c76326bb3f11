"""Run directories: never silently overwritten, resumed only with the same config, one run at a
time, checkpoints of another run never picked, outputs readable as the umask says."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tinymodels import write_jsonl
from tunelab.config import config_from_dict, dump_yaml
from tunelab.train.checkpoint import latest_checkpoint
from tunelab.train.recipe import train
from tunelab.train.rundir import LOCK_FILE, RunDirError, config_diff, open_run


def _cfg(out: Path, **train_kw):
    return config_from_dict({"name": out.name, "output_dir": str(out), "data": {"train": [{"path": "d.jsonl"}]},
                             "train": {"max_steps": 4, **train_kw}})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_dir_holding_a_run_is_refused_naming_the_ways_on(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError) as e:
        open_run(_cfg(run))
    msg = str(e.value)
    assert str(run) in msg and "--resume" in msg and "--overwrite" in msg and "name" in msg
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched


def test_overwrite_moves_the_old_run_to_a_timestamped_backup(tmp_path):
    run = tmp_path / "run"
    first = open_run(_cfg(run))
    first.close()
    (run / "adapter").mkdir()
    (run / "adapter" / "w").write_text("old weights")
    second = open_run(_cfg(run), overwrite=True)
    second.close()
    assert second.backup is not None and second.backup.parent == tmp_path and second.backup.name.startswith("run.bak-")
    assert (second.backup / "adapter" / "w").read_text() == "old weights"  # moved, not deleted
    assert json.loads((second.backup / "run.json").read_text())["run_id"] == first.run_id
    assert json.loads((run / "run.json").read_text())["run_id"] == second.run_id != first.run_id
    assert not (run / "adapter").exists()
    with pytest.raises(RunDirError, match="contradict"):
        open_run(_cfg(run), resume=True, overwrite=True)


def test_resume_refuses_a_changed_config_with_a_diff(tmp_path):
    run = tmp_path / "run"
    open_run(_cfg(run)).close()
    (run / "config.yaml").write_text(dump_yaml(_cfg(run)))
    changed = _cfg(run)
    changed.lora.rank, changed.train.lr = 8, 1e-3
    with pytest.raises(RunDirError) as e:
        open_run(changed, resume=True)
    msg = str(e.value)
    assert "lora.rank: 16 -> 8" in msg and "train.lr: None -> 0.001" in msg
    assert "train.max_steps" not in msg.split("\n", 1)[1]  # not in the diff (it may change)
    assert not (run / LOCK_FILE).exists()  # the refusal released the lock
    # grad_accum may follow the number of processes when the global batch stays the same
    assert "grad_accum" not in "".join(config_diff(dump_yaml(_cfg(run, grad_accum=2)), _cfg(run, grad_accum=4), saved_world=2, world=1))
    assert "train.grad_accum: 2 -> 4" in "".join(config_diff(dump_yaml(_cfg(run, grad_accum=2)), _cfg(run, grad_accum=4)))
    # the keys that may change: steps and cadence
    ok = open_run(_cfg(run, max_steps=40, eval_every=5, save_every=5), resume=True)
    ok.close()
    assert ok.checkpoint is None and any("starting from step 0" in n for n in ok.notes)


def test_a_checkpoint_of_another_run_is_never_picked(tmp_path):
    run = tmp_path / "run"
    mine = open_run(_cfg(run))
    mine.close()
    for step, rid in ((1, mine.run_id), (2, "someone-else")):
        ck = run / "checkpoints" / f"step-{step:07d}"
        ck.mkdir(parents=True)
        (ck / "state.json").write_text(json.dumps({"step": step, "run_id": rid}))
    half = run / "checkpoints" / ".step-0000003.tmp-x"  # a write cut short
    half.mkdir()
    (half / "state.json").write_text(json.dumps({"step": 3, "run_id": mine.run_id}))
    resumed = open_run(_cfg(run), resume=True)
    resumed.close()
    assert resumed.checkpoint == run / "checkpoints" / "step-0000001"
    assert latest_checkpoint(run / "checkpoints").name == "step-0000002"  # without a run id: any run's
    assert not half.exists() and any("partial write" in n for n in resumed.notes)


def test_one_run_per_dir_and_a_stale_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = open_run(_cfg(run))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = json.loads((run / LOCK_FILE).read_text())
        assert lock["pid"] == os.getpid()
        (run / LOCK_FILE).write_text(json.dumps({**lock, "pid": sleeper.pid}))  # a live other process holds it
        with pytest.raises(RunDirError, match=f"in use by another tunelab run \\(pid {sleeper.pid}"):
            open_run(_cfg(run), resume=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    (run / LOCK_FILE).write_text(json.dumps({**lock, "pid": _dead_pid()}))  # its owner died (kill -9)
    again = open_run(_cfg(run), resume=True)
    assert any("stale lock" in n for n in again.notes)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    again.close()
    holder.close()
    assert not (run / LOCK_FILE).exists()


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_run_outputs_honour_the_umask(tmp_path, tiny_model_dir, umask, file_mode, dir_mode):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {w}.", "output": w} for w in "one two three four".split()])
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "model": {"name": tiny_model_dir, "dtype": "fp32"},
                            "data": {"train": [{"path": str(data)}], "audit": "off"}, "train": {"max_steps": 2, "batch_size": 2, "save_every": 1}})
    old = os.umask(umask)
    try:
        train(cfg, console=Console(file=io.StringIO()))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    paths = [run, *run.rglob("*")]
    assert len(paths) > 8
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (dir_mode if p.is_dir() else file_mode), f"{p}: {oct(mode)}"


def test_cli_refuses_a_second_train_into_the_same_run_and_overwrite_keeps_a_backup(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {w}.", "output": w} for w in "one two three four".split()])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  name: {tiny_model_dir}\n  dtype: fp32\ndata:\n  train:\n    - path: d.jsonl\n"
                   "  audit: off\ntrain:\n  max_steps: 1\n  batch_size: 2\n")
    from tunelab.config import load_config

    train(load_config(cfg)[0], console=Console(file=io.StringIO()))  # the first run (in-process: faster)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    again = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg)], capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    err = [x for x in again.stderr.splitlines() if x.startswith("tunelab: error")]
    assert len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0], again.stderr
    over = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--overwrite"], capture_output=True, text=True, env=env)
    assert over.returncode == 0, over.stderr[-2000:]
    backups = sorted(tmp_path.glob("run.bak-*"))
    assert len(backups) == 1 and (backups[0] / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
