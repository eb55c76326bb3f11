"""Merging: base + adapter -> a plain transformers model with the same outputs.

``merge_lora_state_dict`` is a pure function (W' = W + scaling * B @ A, inputs untouched);
``merge_run`` writes a dir that AutoModelForCausalLM loads alone, whose logits equal the base
model with the adapter applied.
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
from tunelab.models.adapters import merge_lora_state_dict
from tunelab.models.merge import merge_run
from tunelab.train.recipe import train

PFX = "base_model.model."




# --------------------------------------------------------------------------- the pure function

def _toy() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    base = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 5, generator=g),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(4, 5, generator=g),
        "model.embed_tokens.weight": torch.randn(10, 5, generator=g),
    }
    adapter = {
        f"{PFX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 5, generator=g),  # (r, in)
        f"{PFX}model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(6, 2, generator=g),  # (out, r)
        # peft keys may keep the adapter name
        f"{PFX}model.layers.0.self_attn.v_proj.lora_A.default.weight": torch.randn(2, 5, generator=g),
        f"{PFX}model.layers.0.self_attn.v_proj.lora_B.default.weight": torch.randn(4, 2, generator=g),
    }
    return base, adapter


def test_merge_lora_state_dict_is_w_plus_scaled_ba_and_pure():
    base, adapter = _toy()
    base_copy = {k: v.clone() for k, v in base.items()}
    adapter_copy = {k: v.clone() for k, v in adapter.items()}
    merged = merge_lora_state_dict(base, adapter, scaling=2.5)

    assert merged is not base and merged.keys() == base.keys()
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    a_q, b_q = adapter[f"{PFX}model.layers.0.self_attn.q_proj.lora_A.weight"], adapter[f"{PFX}model.layers.0.self_attn.q_proj.lora_B.weight"]
    a_v, b_v = adapter[f"{PFX}model.layers.0.self_attn.v_proj.lora_A.default.weight"], adapter[f"{PFX}model.layers.0.self_attn.v_proj.lora_B.default.weight"]
    torch.testing.assert_close(merged[q], base[q] + 2.5 * b_q @ a_q)
    torch.testing.assert_close(merged[v], base[v] + 2.5 * b_v @ a_v)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # inputs untouched
    assert base.keys() == base_copy.keys() and all(torch.equal(base[k], base_copy[k]) for k in base)
    assert adapter.keys() == adapter_copy.keys() and all(torch.equal(adapter[k], adapter_copy[k]) for k in adapter)
    merged[q].add_(1.0)  # the result shares no storage with the inputs
    assert torch.equal(base[q], base_copy[q])


def test_merge_lora_state_dict_dtypes():
    base, adapter = _toy()
    bf = {k: v.to(torch.bfloat16) for k, v in base.items()}
    merged = merge_lora_state_dict(bf, adapter, 1.0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == torch.bfloat16  # the base's dtype by default, computed in fp32
    a, b = adapter[f"{PFX}model.layers.0.self_attn.q_proj.lora_A.weight"], adapter[f"{PFX}model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(merged[q], (bf[q].float() + b @ a).to(torch.bfloat16))
    assert merge_lora_state_dict(base, adapter, 1.0, out_dtype=torch.float16)[q].dtype == torch.float16


def test_merge_lora_state_dict_errors():
    base, adapter = _toy()
    with pytest.raises(KeyError, match="no base weight"):
        merge_lora_state_dict({k: v for k, v in base.items() if "q_proj" not in k}, adapter, 1.0)
    with pytest.raises(KeyError, match="lora_A or lora_B"):
        merge_lora_state_dict(base, {k: v for k, v in adapter.items() if "q_proj.lora_B" not in k}, 1.0)
    assert merge_lora_state_dict(base, {}, 1.0).keys() == base.keys()


# --------------------------------------------------------------------------- merge_run

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    d = tmp_path_factory.mktemp("merge")
    data = write_jsonl(d / "train.jsonl", [{"instruction": f"Name a number after {i}.", "output": str(i + 1)} for i in range(8)])
    cfg = config_from_dict({
        "name": "merge", "output_dir": str(d / "run"),
        "model": {"name": tiny_model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "audit": "off"},
        # alpha != 2 x rank, and adapters on some layers only, so scaling and key mapping matter
        "lora": {"rank": 4, "alpha": 12, "targets": "all-linear", "layers": [1], "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-2, "warmup": 0.0, "seed": 5},
    })
    train(cfg, console=Console(file=io.StringIO()))
    return d / "run"


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Name a number after 41. It is 42, the answer.")["input_ids"]])


def test_merged_logits_equal_base_plus_adapter(trained_run, tmp_path, tiny_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = load_file(str(trained_run / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b), "training should have moved every B off zero"
    assert all(".layers.1." in k for k in adapter)

    out = merge_run(trained_run, tmp_path / "merged")
    assert out == tmp_path / "merged"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.startswith(("adapter_", ".")) for n in names), names

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()  # transformers alone
    assert not any("lora" in k for k in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = _ids(tokenizer)
        base_logits = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, str(trained_run / "adapter")).eval()
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert not torch.allclose(want, base_logits, atol=1e-4), "the adapter should change the outputs"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # only adapted weights changed
    sd_merged = load_file(str(out / "model.safetensors"))
    sd_base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert sd_merged.keys() == sd_base.keys()
    changed = {k for k in sd_base if not torch.equal(sd_base[k], sd_merged[k])}
    assert changed == {k[len(PFX):].replace(".lora_A.weight", ".weight") for k in adapter if ".lora_A." in k}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_merge_to_bf16_and_refusals(trained_run, tmp_path):
    out = merge_run(trained_run, tmp_path / "bf16", dtype="bf16")
    sd = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in sd.values() if v.is_floating_point())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(FileExistsError):
        merge_run(trained_run, out)  # not empty
    with pytest.raises(ValueError):
        merge_run(trained_run, trained_run)
