"""Several processes give the result of one: DDP over gloo on the CPU, launched like a user would.

A run with N processes and grad_accum A has the global batch batch_size x A x N and sees the global
micro-batches in an order that does not depend on N (data/batching.py MicroBatchStream), so
2 processes x A=2 must give the loss trace of 1 process x A=4 (atol 1e-5: only the order of the
gradient all-reduce's sums differs). A checkpoint written by 2 processes resumes on 1.

LoRA dropout is 0 here: each process draws its own dropout masks, so with dropout the traces
agree in distribution, not bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tinymodels import write_jsonl

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, model_dir: str, name: str, grad_accum: int, **train) -> Path:
    rows = [{"instruction": f"Name {k} colours of item {k * 7}.", "output": " ".join(f"colour{k}-{j}" for j in range(1 + k % 9))}
            for k in range(26)]  # 26 examples, batch 2: 13 micro-batches an epoch, not a multiple of the 4 per step
    write_jsonl(tmp_path / "d.jsonl", rows)
    extra = "".join(f"  {k}: {v}\n" for k, v in train.items())
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        f"name: {name}\noutput_dir: {tmp_path / name}\ntemplate: chatml\n"
        f"model:\n  name: {model_dir}\n  dtype: fp32\n"
        f"data:\n  train:\n    - path: {tmp_path / 'd.jsonl'}\n  eval_fraction: 0.2\n  audit: off\n"
        f"lora:\n  rank: 4\n  dropout: 0.0\n  targets: all-linear\n"
        f"train:\n  max_steps: 6\n  batch_size: 2\n  grad_accum: {grad_accum}\n  lr: 0.01\n  eval_every: 3\n"
        f"  early_stopping: {{enabled: false}}\n  max_tokens_per_pass: 40\n{extra}"
    )
    return p


def _run(config: Path, procs: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    if procs == 1:
        cmd = [sys.executable, "-m", "tunelab", "train", str(config), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={_free_port()}",
               "--master_addr=127.0.0.1", "-m", "tunelab", "train", str(config), *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _trace(run_dir: Path, event: str, key: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r[key] for r in rows if r.get("event") == event}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    """The reference: 1 process, grad_accum 4 (global batch 8)."""
    d = tmp_path_factory.mktemp("one")
    out = _run(_config(d, tiny_model_dir, "one", grad_accum=4), 1)
    return d / "one", out


def test_ddp_two_processes_equal_one_with_the_same_global_batch(tmp_path, tiny_model_dir, one_process):
    one_dir, one = one_process
    two = _run(_config(tmp_path, tiny_model_dir, "two", grad_accum=2), 2)
    assert "2 process(es)" in two.stdout and "effective batch 8 (2 x 2 accumulation x 2 process(es))" in two.stdout
    assert "effective batch 8 (2 x 4 accumulation x 1 process(es))" in one.stdout
    t1, t2 = _trace(one_dir, "train", "train_loss"), _trace(tmp_path / "two", "train", "train_loss")
    assert sorted(t1) == sorted(t2) == list(range(1, 7))  # rank 0 alone writes metrics: no duplicate lines
    assert t1[6] < t1[1], "the run should learn"
    for s in t1:
        assert t2[s] == pytest.approx(t1[s], abs=1e-5), f"step {s}"
    e1, e2 = _trace(one_dir, "eval", "eval_loss"), _trace(tmp_path / "two", "eval", "eval_loss")
    assert sorted(e1) == sorted(e2) and e1
    for s in e1:
        assert e2[s] == pytest.approx(e1[s], abs=1e-5)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").exists()


def test_a_run_saved_by_two_processes_resumes_on_one(tmp_path, tiny_model_dir, one_process):
    _run(_config(tmp_path, tiny_model_dir, "two", grad_accum=2, save_every=2, keep_checkpoints=5), 2)
    ckpts = tmp_path / "two" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-0000002", "step-0000004", "step-0000006"]
    for late in ("step-0000004", "step-0000006"):  # as if the 2-process run had died after step 2
        shutil.rmtree(ckpts / late)
    # resumed on one process, keeping the global batch: grad_accum 2 -> 4
    _run(_config(tmp_path, tiny_model_dir, "two", grad_accum=4, save_every=2, keep_checkpoints=5), 1, "--resume")
    t1, t2 = _trace(one_process[0], "train", "train_loss"), _trace(tmp_path / "two", "train", "train_loss")
    assert sorted(t2) == list(range(1, 7))
    for s in range(3, 7):
        assert t2[s] == pytest.approx(t1[s], abs=1e-5), f"step {s} after the resume"


def test_fsdp_on_cpu():
    """accelerate turns on FSDP (ACCELERATE_USE_FSDP / an FSDP plugin) only for accelerator
    devices: in accelerate 1.15 ``AcceleratorState`` sets ``DistributedType.FSDP`` inside the branch
    for MULTI_GPU/MLU/NPU/XPU/HPU/…, never for MULTI_CPU, so an FSDP launch on CPUs runs as DDP.
    torch's own FSDP2 (``fully_shard``) does run on gloo, but tunelab trains through accelerate."""
    from accelerate.state import AcceleratorState
    import inspect

    src = inspect.getsource(AcceleratorState.__init__)
    if "DistributedType.MULTI_CPU" in src.split("self.distributed_type = DistributedType.FSDP")[0].rsplit("elif self.distributed_type in [", 1)[-1]:
        pytest.fail("this accelerate may support FSDP on CPU: write the FSDP equivalence test")
    pytest.skip("FSDP is not available on CPU through accelerate (it enables FSDP only on accelerator devices); "
                "the FSDP path (equal pass counts, gathered checkpoints) is exercised on GPUs only")


def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path, shared_data):
    """benchmarks/gpu_speed.py must run unchanged on the first GPU lent: its --smoke mode runs the
    same code on a CPU with a tiny random Llama for 2 steps (it measures nothing)."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"
    out = subprocess.run([sys.executable, str(bench), "--smoke", "--systems", "tunelab", "--data", str(shared_data / "alpaca_en_demo.json"),
                          "--json", str(tmp_path / "r.json")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    assert rows and rows[0]["system"] == "tunelab" and rows[0]["tokens_per_s"] > 0 and "fast path:" in rows[0]["path"]
