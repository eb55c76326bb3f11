"""kill -9 at any point, resume, and the run ends bit-identical to one never interrupted.

A tiny-model run (LoRA with dropout, so the RNG state matters; a checkpoint every step) is
started as a subprocess and SIGKILLed at 10 points drawn at random (seeded) from: mid forward
pass, right after an optimizer update, half way through a checkpoint write, while an old
checkpoint is removed, half way through a metrics line, at a random moment after a step line
was printed, and while the final adapter is written. After each kill the folder is checked
(every listed checkpoint complete, the half-written one hidden and never picked) and the run is
resumed with ``--resume``. The final adapter must equal the uninterrupted run's bit for bit, and
metrics.jsonl must hold each step's train loss exactly once, equal to the reference's.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from safetensors.torch import load_file

from tinymodels import write_jsonl
from tunelab.config import load_config
from tunelab.train.checkpoint import latest_checkpoint, list_checkpoints
from tunelab.train.recipe import train

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).with_name("chaos_driver.py")
STEPS = 14
KILLS = 10
CKPT_FILES = {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}
FIGURES = Path(os.environ.get("TUNELAB_RELIABILITY_FIGURES", "")) if os.environ.get("TUNELAB_RELIABILITY_FIGURES") else None


def _config(tmp: Path, model_dir: str) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    write_jsonl(tmp / "train.jsonl", [{"instruction": f"Count to {i + 1}.", "output": " ".join(words[: i + 1])} for i in range(12)])
    cfg = tmp / "chaos.yaml"
    cfg.write_text(
        f"output_dir: {tmp / 'run'}\nmodel:\n  name: {model_dir}\n  dtype: fp32\ntemplate: chatml\n"
        f"data:\n  train:\n    - path: {tmp / 'train.jsonl'}\n  audit: off\n"
        f"lora:\n  rank: 4\n  targets: all-linear\n  dropout: 0.1\n"
        f"train:\n  max_steps: {STEPS}\n  batch_size: 2\n  grad_accum: 2\n  lr: 0.005\n  seed: 5\n  save_every: 1\n  keep_checkpoints: 2\n"
    )
    return cfg


def _plan(rng: random.Random) -> list[tuple[str, int]]:
    """10 kill points: two inside checkpoint writes for sure, the final adapter write last."""
    kinds = ["ckpt", "ckpt", "rotate", "metrics", "time", "forward"] + rng.choices(["step", "ckpt", "forward", "time", "metrics"], k=KILLS - 7)
    rng.shuffle(kinds)
    plan = []
    for kind in kinds:
        n = {"ckpt": rng.randint(1, 2), "rotate": 1, "metrics": rng.randint(1, 2), "time": 1,
             "forward": rng.randint(2, 6), "step": rng.randint(1, 2)}[kind]
        plan.append((kind, n))
    return plan + [("adapter", 1)]


class ForkServer:
    """tests/chaos_driver.py --server: imports once, forks one child per run (a real process,
    really SIGKILLed), so 11 runs do not pay 11 times for importing torch and transformers."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "--server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def launch(self, cfg: Path, kill: tuple[str, int], resume: bool, rng: random.Random, log: Path) -> tuple[int, str]:
        argv = ["train", str(cfg)] + (["--resume"] if resume else [])
        spec = "none" if kill[0] == "time" else f"{kill[0]}:{kill[1]}"
        log.write_text("")
        self.proc.stdin.write(json.dumps({"argv": argv, "kill": spec, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if kill[0] == "time":  # kill from outside at a random moment of the step after the kill[1]-th step line
            deadline, seen = time.monotonic() + 120, []
            while len(seen) < kill[1] + 1:
                n = len(re.findall(r"^\s*step \d+", log.read_text(errors="replace"), re.M))
                seen += [time.monotonic()] * (n - len(seen))
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.002)
            step_time = seen[-1] - seen[-2]  # (a step at least: the lines are polled)
            time.sleep(rng.uniform(0.0, step_time))
            os.kill(pid, signal.SIGKILL)
        status = json.loads(self.proc.stdout.readline())["status"]
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return rc, log.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["event"] == "train"]


def _check_folder_after_kill(run: Path, kind: str) -> None:
    """Every listed checkpoint is whole; a write cut short is hidden and never picked."""
    for ck in list_checkpoints(run / "checkpoints"):
        assert {p.name for p in ck.iterdir()} == CKPT_FILES, ck
        assert json.loads((ck / "state.json").read_text())["step"] == int(ck.name.split("-")[1])
    hidden = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] if (run / "checkpoints").exists() else []
    if kind == "ckpt":
        assert any(".tmp-" in h for h in hidden), f"the kill was meant to land inside a checkpoint write: {hidden}"
        latest = latest_checkpoint(run / "checkpoints")
        assert latest is None or not latest.name.startswith(".")
    if kind == "rotate":
        assert any(".old-" in h for h in hidden), hidden


def test_sigkill_at_10_random_points_resumes_bit_identically(tmp_path, tiny_model_dir):
    t0 = time.perf_counter()
    cfg = _config(tmp_path, tiny_model_dir)
    ref_dir = tmp_path / "reference"
    ref_cfg, _ = load_config(cfg, [f"output_dir={ref_dir}"])
    ref = train(ref_cfg, console=Console(file=io.StringIO()))
    assert ref.steps == STEPS

    rng = random.Random(20261202)
    plan = _plan(rng)
    run = tmp_path / "run"
    kills, resumed_from = 0, []
    server = ForkServer()
    for i, kill in enumerate(plan):
        rc, out = server.launch(cfg, kill, i > 0, rng, tmp_path / f"log-{i}.txt")
        assert rc == -signal.SIGKILL, f"kill {kill} did not happen (rc {rc}):\n{out[-3000:]}"
        assert "Traceback" not in out, out[-3000:]
        kills += 1
        _check_folder_after_kill(run, kill[0])
        resumed_from += [int(x) for x in re.findall(r"resumed from.*?at\s+step\s+(\d+)", out, re.S)]
    rc, out = server.launch(cfg, ("none", 0), True, rng, tmp_path / "log-final.txt")
    server.close()
    assert rc == 0, out[-3000:]
    assert "resumed from" in out and "stale lock" in out

    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), f"{k} differs from the uninterrupted run"
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == (ref_dir / "adapter" / "adapter_model.safetensors").read_bytes()

    got, want = _train_rows(run), _train_rows(ref_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "duplicated or missing steps"
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in want]
    assert not [p for p in run.iterdir() if p.name.startswith(".")] and not (run / "train.lock").exists()
    seconds = time.perf_counter() - t0
    if FIGURES:  # docs/reliability.md quotes these
        FIGURES.mkdir(parents=True, exist_ok=True)
        (FIGURES / "chaos.json").write_text(json.dumps({"kills": kills, "plan": plan, "resumed_from_steps": resumed_from,
                                                        "steps": STEPS, "seconds": round(seconds, 1)}))
