"""QLoRA: NF4 base (block 64, double quant) + fp32 LoRA, on the CPU with a tiny random Llama.

Everything but the first test needs bitsandbytes and skips, saying so, when it is not importable.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tinymodels import write_jsonl



def _bnb_or_reason():
    try:
        import bitsandbytes  # noqa: F401

        return None
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes is not importable ({type(e).__name__}: {e}); install it with: pip install 'tunelab[qlora]'"


SKIP_REASON = _bnb_or_reason()
needs_bnb = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
CPU = torch.device("cpu")


def test_missing_backend_says_how_to_install(monkeypatch):
    from tunelab.models import quantize

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(quantize.QuantizationBackendError, match=r"pip install bitsandbytes.*tunelab\[qlora\]"):
        quantize.nf4_config(torch.float32)


# --------------------------------------------------------------------------- NF4 itself

@needs_bnb
def test_nf4_round_trip_error_within_codebook_bounds():
    """Bounds derived from the NF4 code book, not tuned to the observed error.

    A block of 64 weights is scaled by its absmax a into [-1, 1], each x = w/a rounds to the
    nearest of the 16 NF4 levels l_0 < ... < l_15, and w^ = l * a' where a' is the absmax after
    double quantization (8-bit codes, blocks of 256). Relative to the block's true absmax a:
        |w - w^| / a <= |x - l| + |l| * |a' - a| / a <= g_max / 2 + delta,
    g_max the largest gap between adjacent levels (nearest-level rounding is off by at most
    half a gap) and delta the largest relative absmax error, read from the quant state.
    Mean: inside the cell between levels l_i and l_i+1 the error |x - l| runs from 0 to g_i/2;
    with the density roughly flat over a cell it averages g_i/4, so
        E|x - l| ~= sum_i P(l_i < x < l_i+1) * g_i / 4,
    with x = z / m, z ~ N(0, 1) and m = E[max |z| over a block of 64] = int_0^inf 1 - (2 Phi(t) - 1)^64 dt
    (~2.60). The density does fall across the outer cells, so 10% slack covers the flat-cell
    approximation; delta bounds the absmax term.
    """
    import bitsandbytes.functional as F

    from tunelab.models.quantize import NF4_BLOCKSIZE, NESTED_BLOCKSIZE

    levels = F.get_4bit_type("nf4", device="cpu").tolist()
    assert levels == sorted(levels) and levels[0] == -1.0 and levels[-1] == 1.0 and 0.0 in levels
    gaps = [b - a for a, b in zip(levels, levels[1:])]
    g_max = max(gaps)  # 0.3038, between -1 and -0.696

    torch.manual_seed(0)
    w = torch.randn(256, 1024) * 0.02  # normal weights at a typical init scale
    q, st = F.quantize_4bit(w, compress_statistics=True, quant_type="nf4")  # blocksize: bnb's default
    assert st.blocksize == NF4_BLOCKSIZE == 64, "bitsandbytes' default 4-bit block size is no longer 64"
    assert st.nested and st.state2.blocksize == NESTED_BLOCKSIZE and st.absmax.dtype == torch.uint8  # double quant
    assert q.dtype == torch.uint8 and q.numel() == w.numel() // 2  # two 4-bit codes a byte
    w_hat = F.dequantize_4bit(q, st, quant_type="nf4")

    blocks = w.reshape(-1, NF4_BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)
    absmax_dq = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    delta = ((absmax_dq - absmax).abs() / absmax).max().item()
    assert delta < 0.02  # 8-bit dynamic codes keep the scales within ~1%
    rel_err = (w_hat.reshape(-1, NF4_BLOCKSIZE) - blocks).abs() / absmax[:, None]

    assert rel_err.max().item() <= g_max / 2 + delta + 1e-6

    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    dt = 1e-3
    m = sum((1 - (2 * phi(i * dt) - 1) ** NF4_BLOCKSIZE) * dt for i in range(int(8 / dt)))
    expected = sum((phi(b * m) - phi(a * m)) * g / 4 for a, b, g in zip(levels, levels[1:], gaps))  # ~0.0285
    assert rel_err.mean().item() <= 1.10 * expected + delta


@needs_bnb
def test_nf4_config_is_nf4_double_quant_with_compute_dtype():
    from tunelab.models.quantize import nf4_config

    for dt in (torch.float32, torch.bfloat16):
        c = nf4_config(dt)
        assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant
        assert c.bnb_4bit_compute_dtype == dt and c.bnb_4bit_quant_storage == torch.uint8


# --------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """A copy of the conftest tiny Llama with its (tied) embedding scaled from std 0.02 to 0.2.

    At std 0.02 the logits of a 64-wide model span a fraction of a nat: every next-token
    distribution is near uniform over 49k tokens, training can barely move it and comparing
    probabilities would compare ~2e-5 with ~2e-5. Scaled, the model can be confidently right."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("tiny-llama-qlora") / "model"
    shutil.copytree(tiny_model_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] * 10
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


def _cfg(model_dir: str, **kw):
    from tunelab.config import config_from_dict

    d = {"method": "qlora", "model": {"name": model_dir, "dtype": "fp32"},  # qlora + fp32 compute is allowed
         "lora": {"targets": "all-linear", "rank": 4, "dropout": 0.0}}
    d.update(kw)
    return config_from_dict(d)


@needs_bnb
def test_only_lora_trains_and_quantized_weights_get_no_gradient(model_dir):
    import bitsandbytes as bnb

    from tunelab.models.build import build_model
    from tunelab.train.loss import CausalLMLoss
    from tunelab.train.memory import param_breakdown

    built = build_model(_cfg(model_dir), CPU)
    model = built.model
    assert built.compute_dtype == torch.float32
    base = model.get_base_model()
    q4 = [(n, m) for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q4) == 2 * 7  # q k v o gate up down in each of the 2 layers
    for _, m in q4:
        qs = m.weight.quant_state
        assert (qs.quant_type, qs.blocksize, qs.nested) == ("nf4", 64, True)
    # embeddings, lm_head (tied) and norms stay unquantized, in the compute dtype
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit) and base.lm_head.weight.dtype == torch.float32
    assert base.model.embed_tokens.weight.dtype == torch.float32 and base.model.norm.weight.dtype == torch.float32

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # LoRA A and B in fp32
    assert not any(getattr(p, "quant_state", None) is not None and p.requires_grad for p in model.parameters())

    with torch.no_grad():  # B = 0 at init; make it nonzero so A gets a gradient too
        for n, p in trainable.items():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    ids = torch.randint(0, 1000, (2, 12))
    loss, n = CausalLMLoss(model)(ids, torch.ones_like(ids), ids)
    (loss / n).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for _, m in q4:
        assert m.weight.grad is None and m.weight.dtype == torch.uint8

    # memory report: a Params4bit costs its packed codes + absmax codes + nested absmax + code books + offset
    expected = 0
    for _, m in q4:
        qs, numel = m.weight.quant_state, math.prod(m.weight.quant_state.shape)
        expected += numel // 2 + numel // 64 + 4 * math.ceil(numel / 64 / 256) + 4 * 256 + 4 * 16 + 4
    kinds = param_breakdown(model)
    assert kinds["frozen quantized"]["bytes"] == expected
    assert kinds["frozen quantized"]["params"] == sum(math.prod(m.weight.quant_state.shape) for _, m in q4)
    assert kinds["trainable"]["bytes"] == 4 * kinds["trainable"]["params"]


@needs_bnb
def test_adapter_round_trip(model_dir, tmp_path):
    from peft import PeftModel

    from tunelab.models.build import build_model
    from tunelab.models.load import load_model
    from tunelab.models.quantize import nf4_config, prepare_quantized_base

    cfg = _cfg(model_dir)
    model = build_model(cfg, CPU).model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 1000, (2, 10))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys and all("lora_" in k for k in keys)  # the adapter only, never the NF4 base

    base = prepare_quantized_base(load_model(model_dir, torch.float32, quantization_config=nf4_config(torch.float32)), CPU)
    again = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        after = again(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- train, generate, merge

@pytest.fixture(scope="module")
def qlora_run(model_dir, tmp_path_factory):
    """A short QLoRA run through the recipe on a learnable task (the answer is always the same)."""
    from rich.console import Console

    from tunelab.train.recipe import train

    d = tmp_path_factory.mktemp("qlora-run")
    rows = [{"messages": [{"role": "user", "content": f"Pick a colour, {i}."}, {"role": "assistant", "content": "Blue, always blue."}]}
            for i in range(24)]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "eval.jsonl", rows[:4])
    cfg = _cfg(
        model_dir, name="qlora-tiny", output_dir=str(d / "run"),
        data={"train": [str(d / "train.jsonl")], "eval": str(d / "eval.jsonl"), "max_seq_len": 64, "audit": "off"},
        train={"max_steps": 8, "batch_size": 6, "lr": 1e-2, "warmup": 0.0, "eval_every": 8, "early_stopping": {"enabled": False}},
    )
    console = Console(record=True, width=200, force_terminal=False)
    result = train(cfg, console=console)
    return result, console.export_text(), cfg


@needs_bnb
def test_qlora_training_reduces_loss_and_reports(qlora_run):
    result, out, _ = qlora_run
    assert result.steps == 8
    first, last = result.losses[0], sum(result.losses[-3:]) / 3
    assert last < first - 1.0, result.losses
    # start of run: parameters by kind with bytes; NF4 vs unquantized eval loss with the delta
    assert "frozen NF4 4-bit" in out and "trainable fp32" in out and "frozen fp32" in out
    assert "quantization cost" in out and "NF4" in out and "delta" in out
    cost = json.loads((result.run_dir / "quantization_cost.json").read_text())
    assert math.isfinite(cost["eval_loss_nf4"]) and math.isfinite(cost["eval_loss_unquantized"])
    assert cost["eval_loss_nf4"] != cost["eval_loss_unquantized"]  # the quantized base really differs
    assert abs(cost["delta"]) < 0.5  # ... but not by much
    assert "peak_rss" in out  # peak memory at the end
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").exists()


@needs_bnb
def test_merge_matches_qlora_forward(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.infer.generate import load_for_inference
    from tunelab.models.merge import merge_run
    from tunelab.models.merge import dequantized_base_state_dict

    result, _, cfg = qlora_run
    loaded = load_for_inference(str(result.run_dir), device=CPU)  # NF4 base + the trained adapter
    out = merge_run(result.run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Pick a colour, 3."}], add_generation_prompt=True, return_dict=False)
    ids = torch.tensor([list(ids) + loaded.tokenizer("Blue, always")["input_ids"]])
    with torch.no_grad():
        p_qlora = loaded.model(input_ids=ids).logits.float().softmax(-1)
        p_merged = merged(input_ids=ids).logits.float().softmax(-1)
        with loaded.model.disable_adapter():
            p_nf4 = loaded.model(input_ids=ids).logits.float().softmax(-1)
    assert (p_qlora - p_nf4).abs().max() > 0.05  # training moved the next-token distribution
    torch.testing.assert_close(p_merged, p_qlora, atol=1e-2, rtol=0)  # peft's 4-bit merge tolerance
    # fp32 compute: only summation order differs. On AVX512-BF16 CPUs bitsandbytes would switch
    # eval-mode 4-bit layers to a bf16-only kernel (max diff 1.2e-4 here); inference keeps the
    # standard fp32 layout when the compute dtype is fp32 (quantize.honour_compute_dtype).
    from tunelab.models.quantize import quantized_linears

    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for _, m in quantized_linears(loaded.model))
    torch.testing.assert_close(p_merged, p_qlora, atol=1e-4, rtol=0)

    # the merged base is the NF4-dequantized one the adapter trained on, not the original weights
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    orig = load_file(str(Path(cfg.model.name) / "model.safetensors"))
    deq = dequantized_base_state_dict(cfg, cfg.model.name, device=CPU)
    k = "model.layers.0.mlp.down_proj.weight"
    q, st = F.quantize_4bit(orig[k], blocksize=64, compress_statistics=True, quant_type="nf4")
    torch.testing.assert_close(deq[k], F.dequantize_4bit(q, st, quant_type="nf4"), atol=0, rtol=0)
    assert not torch.equal(deq[k], orig[k])
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(deq[key], orig[key])  # untouched
