"""GGUF export: tensor names and the q/k permutation llama.cpp expects, tokenizer and chat
template metadata, F16 and Q8_0 via gguf's quants, proven by loading the file back with
transformers (``gguf_file=``) and comparing logits with the merged model.

Tolerances, and why:
* f16 vs the merged model with its weights rounded to fp16: the same numbers computed in fp32,
  so they agree to fp32 reduction-order noise (atol 1e-5). Against the fp32 merged model the
  difference is the fp16 rounding of the weights (relative <= 2^-11 ~ 4.9e-4 per weight): the
  max |logit difference| stays within 5e-3 x max |logit| (10x that rounding, for the
  compounding over a few layers' matmuls).
* q8_0: the loaded weights equal gguf's own dequantize(quantize(W)) exactly; Q8_0 keeps 8 bits
  per value with one fp16 scale per 32 values (error <= scale/2 per weight), so the argmax
  (next token) must agree on >= 90% of positions of the test prompts.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from tinymodels import make_learnable_llama, make_small_bpe_tokenizer, write_jsonl
from tunelab.config import config_from_dict
from tunelab.data.render import BUILTIN_TEMPLATES
from tunelab.models import export_gguf
from tunelab.models.export_gguf import ExportError, export_model_dir, permute_qk
from tunelab.models.merge import merge_run
from tunelab.train.recipe import train

gguf = pytest.importorskip("gguf")

PROMPTS = ["Name a number after 41. It is 42, the answer.", "The quick brown fox jumps over the lazy dog.",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", "def add(a, b):\n    return a + b\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small real byte-level BPE (SmolLM2's 49k vocab makes each GGUF read take seconds:
    the embedded model's own export is the slow test at the end)."""
    return make_small_bpe_tokenizer(tmp_path_factory.mktemp("small-tok"))


@pytest.fixture(scope="module")
def run_and_merged(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("export")
    base = make_learnable_llama(d / "base", tokenizer, seed=3)
    data = write_jsonl(d / "train.jsonl", [{"instruction": f"Name a number after {i}.", "output": str(i + 1)} for i in range(8)])
    cfg = config_from_dict({
        "name": "export", "output_dir": str(d / "run"), "template": "chatml",
        "model": {"name": base, "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "audit": "off"},
        "lora": {"rank": 4, "targets": "all-linear", "dropout": 0.0},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 5e-2, "warmup": 0.0, "seed": 1},
    })
    train(cfg, console=Console(file=io.StringIO()))
    return d / "run", merge_run(d / "run", d / "merged")


def _logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])).logits[0] for p in PROMPTS]


def _fp16_rounded(model_dir: Path):
    """The model with its matrices rounded to fp16 (what an F16 GGUF stores), computing in fp32."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    return m


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return m, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_f16_round_trip_through_the_cli(run_and_merged, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    run, merged_dir = run_and_merged
    out = tmp_path / "model-f16.gguf"
    r = _cli("export", str(run), "--gguf", str(out))
    assert r.returncode == 0, r.stderr
    assert f"GGUF written to {out}: llama, f16" in r.stdout and "F16" in r.stdout and "F32" in r.stdout

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    rounded = _fp16_rounded(merged_dir)
    loaded, tok2 = _load_gguf(out)
    got, want, want16 = _logits(loaded, tokenizer), _logits(merged, tokenizer), _logits(rounded, tokenizer)
    for g, w, w16 in zip(got, want, want16):
        torch.testing.assert_close(g, w16, rtol=0, atol=1e-5)  # the same weights: exact up to fp32 noise
        assert (g - w).abs().max() <= 5e-3 * w.abs().max()
    # tokenizer and chat template travel with the file
    for p in PROMPTS:
        assert tok2(p, add_special_tokens=False)["input_ids"] == tokenizer(p, add_special_tokens=False)["input_ids"]
    assert tok2.chat_template == BUILTIN_TEMPLATES["chatml"]

    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt2"
    # q rows are stored in ggml's interleaved RoPE order, not transformers'
    from safetensors.torch import load_file

    q = load_file(str(merged_dir / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert np.array_equal(np.asarray(stored.data).reshape(q.shape), permute_qk(q, 4).half().numpy())
    assert not torch.equal(permute_qk(q, 4), q)


def test_without_the_qk_permutation_the_round_trip_fails(run_and_merged, tmp_path, tokenizer, monkeypatch):
    """The comparison above can fail: skip the permutation and the logits are far off."""
    from transformers import AutoModelForCausalLM

    _, merged_dir = run_and_merged
    monkeypatch.setattr(export_gguf, "permute_qk", lambda w, n: w)
    out = export_model_dir(merged_dir, tmp_path / "unpermuted.gguf").path
    got = _logits(_load_gguf(out)[0], tokenizer)
    want = _logits(AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval(), tokenizer)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) > 0.05


def test_q8_0_round_trip(run_and_merged, tmp_path, tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, merged_dir = run_and_merged
    info = export_model_dir(merged_dir, tmp_path / "model-q8_0.gguf", "q8_0")
    f16 = export_model_dir(merged_dir, tmp_path / "model-f16.gguf", "f16")
    assert info.types["Q8_0"] == 15 and info.types["F32"] == 5 and info.bytes < 0.7 * f16.bytes
    loaded, _ = _load_gguf(info.path)
    sd = load_file(str(merged_dir / "model.safetensors"))
    w = sd["model.layers.1.mlp.down_proj.weight"].numpy()
    want_w = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(loaded.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy(), want_w)
    got = _logits(loaded, tokenizer)
    want = _logits(AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval(), tokenizer)
    agree = torch.cat([(g.argmax(-1) == w.argmax(-1)).float() for g, w in zip(got, want)]).mean().item()
    assert agree >= 0.9, agree


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_llama_family_archs_round_trip(kind, tmp_path, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    C, M = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    model = M(C(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=kind == "qwen2",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):  # Qwen2's q/k/v biases: make them matter
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / f"tiny-{kind}")
    tokenizer.save_pretrained(tmp_path / f"tiny-{kind}")
    info = export_model_dir(tmp_path / f"tiny-{kind}", tmp_path / "out" / "m.gguf")
    assert info.arch == ("qwen2" if kind == "qwen2" else "llama")
    if kind == "qwen2":
        assert info.types["F32"] == 5 + 3 * 2  # norms + q/k/v biases of 2 layers
    for g, w in zip(_logits(_load_gguf(info.path)[0], tokenizer), _logits(model, tokenizer)):
        assert (g - w).abs().max() <= 5e-3 * w.abs().max()


def test_refusals(run_and_merged, tmp_path, capsys):
    run, _ = run_and_merged
    (tmp_path / "taken.gguf").write_bytes(b"user data")
    from tunelab.cli import main

    assert main(["export", str(run), "--gguf", str(tmp_path / "taken.gguf")]) == 2
    assert "exists; choose a new output file" in capsys.readouterr().err
    assert (tmp_path / "taken.gguf").read_bytes() == b"user data"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportError, match="supports the Llama family .* not model_type 'gpt2'"):
        export_model_dir(tmp_path / "gpt2", tmp_path / "g.gguf")
    assert not list(tmp_path.glob(".g.gguf*"))  # no temp file left behind


@pytest.mark.slow
def test_llama_cpp_runs_the_export(run_and_merged, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: PyPI ships it as a source "
                                    "distribution that compiles llama.cpp (no wheel), too slow for CI on 2 cores")
    out = export_model_dir(run_and_merged[1], tmp_path / "m.gguf").path
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False)
    assert llm.tokenize(b"Hello world", add_bos=False)
    assert llm("Name a number after 41.", max_tokens=4)["choices"][0]["text"] is not None


@pytest.mark.slow
def test_embedded_smollm2_round_trip_figures(tmp_path, tokenizer_dir):
    """The embedded SmolLM2-135M after a one-step LoRA run: f16 and q8_0 GGUF vs the merged model.
    Prints the figures (max |logit diff|, next-token agreement, file sizes)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    real_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Name a number after {i}.", "output": str(i + 1)} for i in range(8)])
    cfg = config_from_dict({
        "name": "smol-export", "output_dir": str(tmp_path / "run"),
        "model": {"name": "smollm2-135m-instruct", "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "audit": "off", "max_seq_len": 64},
        "lora": {"rank": 8, "targets": "all-linear"},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "warmup": 0.0},
    })
    train(cfg, console=Console(file=io.StringIO()))
    merged_dir = merge_run(tmp_path / "run", tmp_path / "merged")
    want = _logits(AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval(), real_tok)
    rounded = _fp16_rounded(merged_dir)
    want16 = _logits(rounded, real_tok)
    del rounded
    figures = {}
    for qtype in ("f16", "q8_0"):
        info = export_model_dir(merged_dir, tmp_path / f"smol-{qtype}.gguf", qtype, name="smol-export")
        from transformers import AutoModelForCausalLM as Auto

        model = Auto.from_pretrained(str(info.path.parent), gguf_file=info.path.name, dtype=torch.float32).eval()
        got = _logits(model, real_tok)
        figures[qtype] = {
            "bytes": info.bytes,
            "max_abs_logit_diff": max((g - w).abs().max().item() for g, w in zip(got, want)),
            "max_abs_logit": max(w.abs().max().item() for w in want),
            "next_token_agreement": torch.cat([(g.argmax(-1) == w.argmax(-1)).float() for g, w in zip(got, want)]).mean().item(),
            "positions": sum(len(w) for w in want),
        }
        if qtype == "f16":
            figures[qtype]["max_abs_logit_diff_vs_fp16_rounded_weights"] = max((g - w).abs().max().item() for g, w in zip(got, want16))
        if qtype == "f16":  # the real 49k-token vocab and merges survive the trip
            tok2 = AutoTokenizer.from_pretrained(str(info.path.parent), gguf_file=info.path.name)
            assert all(tok2(p, add_special_tokens=False)["input_ids"] == real_tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS)
        del model
    figures["safetensors_fp32_bytes"] = (merged_dir / "model.safetensors").stat().st_size
    print("\nGGUF round trip, embedded SmolLM2-135M:", json.dumps(figures, indent=1))
    f16, q8 = figures["f16"], figures["q8_0"]
    # f16: the same numbers as the merged model with fp16-rounded weights (fp32 noise over 30
    # layers); vs fp32 weights within 5e-3 x max |logit|; a near-tie may flip the argmax
    assert f16["max_abs_logit_diff_vs_fp16_rounded_weights"] <= 1e-3
    assert f16["max_abs_logit_diff"] <= 5e-3 * f16["max_abs_logit"] and f16["next_token_agreement"] >= 0.95
    assert q8["next_token_agreement"] >= 0.9 and q8["bytes"] < 0.6 * f16["bytes"]
