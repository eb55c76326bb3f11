"""The recipe end to end: a golden loss trace, and ``python -m tunelab train CONFIG``.

Golden trace: a fixed, seeded tiny config (length grouping, grad accumulation, warmup +
cosine to a floor, clipping) whose first 10 train losses and LRs are stored in
``tests/golden/recipe_trace.json`` and compared at rtol 1e-4. Any change to data order,
masking, loss normalisation, initialisation, schedule or optimizer shows up here. LoRA dropout
is 0 on purpose: how dropout masks are drawn from the RNG is an implementation detail (a fused
decoder draws them differently), while the trace should hold for any implementation of the
same computation. Dropout with exact RNG replay is covered by test_resume.py.

To regenerate after an *intended* change (or a torch/transformers/peft upgrade that changes
random initialisation), run::

    TUNELAB_UPDATE_GOLDEN=1 python -m pytest tests/test_recipe_golden.py -k golden

and commit the new file together with the change that explains it.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tinymodels import make_tiny_llama, write_jsonl
from tunelab.config import config_from_dict, load_config
from tunelab.train.reporting import METRIC_KEYS
from tunelab.train.schedule import lr_factor

GOLDEN = Path(__file__).parent / "golden" / "recipe_trace.json"
UPDATE = os.environ.get("TUNELAB_UPDATE_GOLDEN") == "1"




def _rows(n: int) -> list[dict]:
    """Deterministic examples of varied lengths (no randomness outside the seeded recipe)."""
    topics = ["rivers", "mountains", "clouds", "forests", "deserts", "oceans", "islands", "glaciers"]
    rows = []
    for i in range(n):
        t = topics[i % len(topics)]
        rows.append({"instruction": f"Write {1 + i % 5} short facts about {t}.",
                     "output": " ".join(f"Fact {k + 1}: {t} are item {i * 7 + k}." for k in range(1 + i % 5))})
    return rows


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__, "peft": peft.__version__}


def test_golden_loss_trace(tmp_path, tokenizer):
    from tunelab.train.recipe import train

    model_dir = make_tiny_llama(tmp_path / "model", tokenizer, seed=1234)
    data = write_jsonl(tmp_path / "train.jsonl", _rows(12))
    cfg = config_from_dict({
        "name": "golden", "output_dir": str(tmp_path / "run"),
        "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "audit": "off"},
        "lora": {"rank": 8, "targets": "attention", "dropout": 0.0},
        "train": {"max_steps": 10, "batch_size": 3, "grad_accum": 2, "lr": 2e-2, "warmup": 0.2, "schedule": "cosine",
                  "min_lr_ratio": 0.1, "max_grad_norm": 1.0, "seed": 7, "length_grouping": True},
    })
    res = train(cfg, console=Console(file=io.StringIO()))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trace = {
        "losses": res.losses,
        "lrs": [r["lr"] for r in rows if r["event"] == "train"],
        "trained_tokens": [r["trained_tokens"] for r in rows if r["event"] == "train"],
    }
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"versions": _versions(), **trace}, indent=1) + "\n")
        pytest.skip(f"TUNELAB_UPDATE_GOLDEN=1: wrote {GOLDEN}")
    assert GOLDEN.exists(), f"{GOLDEN} is missing; create it with TUNELAB_UPDATE_GOLDEN=1 (see this file's docstring)"
    golden = json.loads(GOLDEN.read_text())
    note = f"(golden made with {golden['versions']}, now {_versions()}; see the docstring to regenerate after an intended change)"
    assert len(res.losses) == 10
    assert trace["trained_tokens"] == golden["trained_tokens"], f"data or masking changed {note}"
    assert trace["lrs"] == pytest.approx(golden["lrs"], rel=1e-12), f"LR schedule changed {note}"
    assert trace["losses"] == pytest.approx(golden["losses"], rel=1e-4), f"loss trace changed {note}"
    # a trace that does not move would make the comparison toothless
    assert max(golden["losses"]) - min(golden["losses"]) > 100 * 1e-4 * max(golden["losses"])


def test_python_m_tunelab_entry_point():
    """The module entry point parses the train verb (cheap: no training, no torch import)."""
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--resume" in proc.stdout and "--set" in proc.stdout


def test_cli_train_end_to_end(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """``tunelab train CONFIG --set ...`` through the CLI's ``main`` (what ``python -m tunelab``
    runs), config from YAML with dataset paths relative to the config file."""
    from tunelab.cli import main

    cfg_dir = tmp_path / "project"
    cfg_dir.mkdir()
    write_jsonl(cfg_dir / "train.jsonl", _rows(8))
    write_jsonl(cfg_dir / "eval.jsonl", _rows(11)[8:])
    (cfg_dir / "tiny.yaml").write_text(
        f"model:\n  name: {tiny_model_dir}\n  dtype: fp32\n"
        "data:\n  train:\n    - path: train.jsonl\n  eval: eval.jsonl\n  audit: \"off\"\n"
        "lora:\n  rank: 4\n"
        "train:\n  max_steps: 100\n  batch_size: 2\n  lr: 0.001\n  eval_every: 2\n  warmup: 0.25\n"
    )
    work = tmp_path / "work"  # runs/<name> lands under the working directory
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["train", str(cfg_dir / "tiny.yaml"), "--set", "train.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "train.max_steps=4" in out  # overrides are reported
    run_dir = work / "runs" / "tiny"  # name defaults to the config file's stem

    # config.yaml: the resolved config, loadable again
    saved, _ = load_config(run_dir / "config.yaml")
    assert saved.name == "tiny" and saved.train.max_steps == 4 and saved.lora.rank == 4
    assert saved.data.train[0].path == str(cfg_dir / "train.jsonl") and saved.data.eval.path == str(cfg_dir / "eval.jsonl")

    # metrics.jsonl: every line has every key; train lines carry losses and throughput
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(set(METRIC_KEYS) <= set(r) for r in rows), rows[0]
    assert set(METRIC_KEYS) == {"step", "epoch", "lr", "train_loss", "eval_loss", "trained_tokens", "tokens_per_s"}
    train_rows = [r for r in rows if r["event"] == "train"]
    eval_rows = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_rows] == [0, 2, 4]  # base eval before training (early stopping on)
    for r in train_rows:
        assert math.isfinite(r["train_loss"]) and r["eval_loss"] is None
        assert r["tokens_per_s"] > 0 and r["trained_tokens"] > 0 and r["epoch"] > 0
        assert r["lr"] == pytest.approx(1e-3 * lr_factor(r["step"] - 1, 4, 1, "cosine", 0.0), rel=1e-12)
    assert [r["trained_tokens"] for r in train_rows] == sorted({r["trained_tokens"] for r in train_rows})
    assert train_rows[-1]["epoch"] == pytest.approx(1.0)  # 4 steps of 2 examples over 8 examples
    for r in eval_rows:
        assert math.isfinite(r["eval_loss"]) and r["train_loss"] is None

    # adapter/: a peft adapter with the tokenizer beside it
    names = {p.name for p in (run_dir / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    ac = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert ac["r"] == 4 and ac["lora_alpha"] == 8 and sorted(ac["target_modules"]) == ["q_proj", "v_proj"]
    assert (run_dir / "checkpoints").is_dir()
