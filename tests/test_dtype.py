"""Dtype-sensitive checks, run by .ci/run with compute forced to bf16 and to fp32.

Each test takes ``compute_dtype_name`` (tests/conftest.py), sets ``model.dtype`` to it and
derives its tolerance from that dtype's unit roundoff, so it holds on any x86-64 CPU.
"""

from __future__ import annotations

import io

import torch
from rich.console import Console

from tinymodels import dtype_tolerance, write_jsonl
from tunelab.config import config_from_dict
from tunelab.models.merge import merge_run
from tunelab.train.recipe import train

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _run(tmp_path, model_dir, dtype: str):
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Name a number after {i}.", "output": str(i + 1)} for i in range(8)])
    cfg = config_from_dict({
        "name": "dt", "output_dir": str(tmp_path / "run"),
        "model": {"name": model_dir, "dtype": dtype},
        "data": {"train": [{"path": str(data)}], "audit": "off"},
        "lora": {"rank": 4, "alpha": 12, "targets": "all-linear", "dropout": 0.0},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-2, "warmup": 0.0, "seed": 5},
    })
    return train(cfg, console=Console(file=io.StringIO())), tmp_path / "run"


def test_training_learns_and_merge_matches_adapter_at_compute_dtype(tmp_path, tiny_model_dir, tokenizer, compute_dtype_name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, run = _run(tmp_path, tiny_model_dir, compute_dtype_name)
    assert result.losses[-1] < result.losses[0], result.losses
    dt = TORCH[compute_dtype_name]
    merged_dir = merge_run(run, tmp_path / "merged", compute_dtype_name)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dt).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dt).eval()
    ids = torch.tensor([tokenizer("Name a number after 41. It is 42, the answer.")["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
        want = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    scale = want.abs().max().item()
    # Merging rounds W + (alpha/r) BA once to the dtype; the adapter forward rounds each product:
    # both are within a few units of roundoff of the exact result (measured on this tiny model:
    # 9 units in fp32, 2 in bf16), 32 units are allowed.
    tol = dtype_tolerance(compute_dtype_name, 32) * scale
    diff = (got - want).abs().max().item()
    moved = (want - base_logits).abs().max().item()
    assert diff <= tol, f"{compute_dtype_name}: merged vs adapter forward differ by {diff:.3g} > {tol:.3g}"
    assert moved > 5 * tol, f"the adapter moved the logits by {moved:.3g} only: the comparison would be toothless"
