"""The fast training path computes the same thing as a plain one.

Fast path (the defaults): the fused decoder (packed examples, hand-written backward), lm_head
and cross-entropy only at trained positions in chunks, untrained tails dropped, micro-batches
split by ``max_tokens_per_pass``. Reference: a plain loop written here, with the transformers
forward, full ``(B, T, V)`` logits, padded batches, one pass per batch. With the same seed and
data order, the loss trace must match within 1% (in fp32 it matches to ~1e-6).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from tinymodels import make_tiny_llama, write_jsonl
from tunelab.config import config_from_dict
from tunelab.data.batching import collate, split_by_tokens, trained_length
from tunelab.data.pipeline import prepare_data
from tunelab.data.render import IGNORE, EncodedExample, Renderer
from tunelab.models.build import build_model
from tunelab.data.batching import MicroBatchStream
from tunelab.kernels.fused_llama import _mask
from tunelab.kernels.linear_ce import linear_cross_entropy
from tunelab.train.loss import CausalLMLoss, pack
from tunelab.train.recipe import train
from tunelab.train.schedule import make_scheduler

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: per-op overhead dominates
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-fast"), tokenizer, seed=5, layers=2, hidden=64)


@pytest.fixture
def data_file(tmp_path):
    topics = ["rivers", "clouds", "forests", "deserts", "oceans", "glaciers", "islands"]
    rows = []
    for i in range(12):  # lengths from a few tokens to ~120: padding, packing and splitting all matter
        t = topics[i % len(topics)]
        rows.append({"instruction": f"Tell me {1 + i % 6} things about {t}." + (" Be brief." if i % 3 else ""),
                     "output": " ".join(f"{t} fact {k}: item {i * 3 + k}." for k in range(1 + (i * 5) % 11))})
    return write_jsonl(tmp_path / "train.jsonl", rows)


def _cfg(model_dir, data, out, **train_kw):
    return config_from_dict({
        "name": "fast", "output_dir": str(out),
        "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "audit": "off"},
        "lora": {"rank": 4, "targets": "all-linear", "dropout": 0.0},
        "train": {"max_steps": 5, "batch_size": 4, "lr": 1e-2, "warmup": 0.2, "schedule": "cosine",
                  "max_grad_norm": 1.0, "seed": 11, **train_kw},
    })


def _plain_loop(cfg) -> list[float]:
    """The reference: same seed, init and batch order as the recipe, nothing clever."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    built = build_model(cfg, CPU)
    model, tok = built.model, built.tokenizer
    data = prepare_data(cfg, Renderer(tok, cfg.template))
    stream = MicroBatchStream([len(e) for e in data.train], cfg.train.batch_size, cfg.train.seed, cfg.train.length_grouping)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.999))
    sched = make_scheduler(opt, cfg.train.max_steps, cfg.train.warmup, cfg.train.schedule, cfg.train.min_lr_ratio)
    model.train()
    losses = []
    for step in range(cfg.train.max_steps):
        b = collate([data.train[i] for i in stream[step]], tok.pad_token_id, trim=False)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_fast_loss_trace_matches_plain_reference(model_dir, data_file, tmp_path):
    # max_tokens_per_pass=96 splits every batch into several passes: the split is exercised too
    cfg = _cfg(model_dir, data_file, tmp_path / "fast", max_tokens_per_pass=96)
    assert cfg.train.fused_decoder and cfg.train.trained_logits_only
    res = train(cfg, console=Console(file=io.StringIO()))
    ref = _plain_loop(cfg)
    assert len(res.losses) == len(ref) == 5
    assert ref[-1] < ref[0] - 0.05, "the run should learn, or the comparison says little"
    for step, (a, b) in enumerate(zip(res.losses, ref)):
        assert a == pytest.approx(b, rel=1e-2), f"step {step + 1}: fast {a} vs reference {b}"
    # in fp32 the two agree far more tightly than the 1% contract
    assert max(abs(a - b) / b for a, b in zip(res.losses, ref)) < 1e-4


def _lora_model(model_dir, targets="all-linear", dropout=0.0, seed=0):
    cfg = config_from_dict({"model": {"name": model_dir, "dtype": "fp32"}, "lora": {"rank": 4, "targets": targets, "dropout": dropout}})
    torch.manual_seed(seed)
    built = build_model(cfg, CPU)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so every LoRA matrix gets gradients
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return built


def _batch(tokenizer, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for i in range(n):
        L = int(torch.randint(3, 40, (1,), generator=g))
        ids = torch.randint(10, 2000, (L,), generator=g).tolist()
        start = int(torch.randint(1, L, (1,), generator=g))
        labels = [IGNORE] * start + ids[start:]
        if i % 2:  # an untrained tail, as chat templates leave after the end-of-turn token
            ids, labels = ids + [7, 8], labels + [IGNORE, IGNORE]
        exs.append(EncodedExample(ids, labels))
    return exs


@pytest.mark.parametrize("targets", ["qv", "all-linear"])
def test_fused_loss_and_gradients_equal_transformers(model_dir, tokenizer, targets):
    built = _lora_model(model_dir, targets)
    model = built.model
    exs = _batch(tokenizer)
    b = collate(exs, tokenizer.pad_token_id, trim=False)
    assert (b.attention_mask == 0).any()
    params = [p for p in model.parameters() if p.requires_grad]
    fast, ref = CausalLMLoss(model, True, True), CausalLMLoss(model, False, False)
    assert fast.fused is not None, fast.fused_reason
    out = {}
    for name, fn in (("fast", fast), ("ref", ref)):
        loss, n = fn(b.input_ids, b.attention_mask, b.labels)
        out[name] = (loss.item(), int(n), torch.autograd.grad(loss / n, params))
    assert out["fast"][1] == out["ref"][1] == b.n_trained
    assert out["fast"][0] == pytest.approx(out["ref"][0], rel=1e-5)
    for p, a, r in zip(params, out["fast"][2], out["ref"][2]):
        assert torch.count_nonzero(r) > 0
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-7)


def test_fused_decoder_is_cpu_only_and_steps_aside_elsewhere(model_dir):
    """Its attention calls the CPU flash kernels: on another device (meta stands in for CUDA
    here) the transformers forward runs instead, with trained-only logits."""
    built = _lora_model(model_dir, "qv")
    assert CausalLMLoss(built.model, True, True).fused is not None
    fn = CausalLMLoss(built.model.to("meta"), True, True)
    assert fn.fused is None and "device meta" in fn.fused_reason


def test_fused_sees_base_weights_changed_in_place(model_dir, tokenizer):
    """The fused q/k/v weight is cached between passes; writing a base weight in place (or
    swapping it) must invalidate the cache, or the fast path would train on stale weights."""
    built = _lora_model(model_dir, "qv", seed=2)
    model = built.model
    b = collate(_batch(tokenizer, seed=6), tokenizer.pad_token_id)
    fast, ref = CausalLMLoss(model, True, True), CausalLMLoss(model, False, False)
    assert fast.fused is not None, fast.fused_reason
    before = fast(b.input_ids, b.attention_mask, b.labels)[0].item()
    layer = fast.fused.lm.model.layers[0].self_attn
    with torch.no_grad():
        layer.v_proj.base_layer.weight.mul_(5.0)  # in place: same tensor, new version
        layer.k_proj.weight = torch.nn.Parameter(layer.k_proj.weight * 0.5, requires_grad=False)  # swapped
    after, expected = fast(b.input_ids, b.attention_mask, b.labels)[0].item(), ref(b.input_ids, b.attention_mask, b.labels)[0].item()
    assert abs(expected - before) > 1e-3 * abs(before)  # a stale cache would give `before`
    assert after == pytest.approx(expected, rel=1e-5)


def test_shared_prefix_is_exact(model_dir, tokenizer):
    """A prompt prefix common to the examples is computed once; loss and gradients don't change."""
    built = _lora_model(model_dir, "all-linear", seed=4)
    model = built.model
    prefix = tokenizer("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n")["input_ids"]
    exs = [EncodedExample(prefix + e.input_ids, [IGNORE] * len(prefix) + e.labels) for e in _batch(tokenizer, seed=9)]
    b = collate(exs, tokenizer.pad_token_id)
    packed = pack(b.input_ids, b.attention_mask, b.labels)
    assert packed.shared_prefix >= len(prefix) and len(packed.ids) == b.n_real - (len(exs) - 1) * packed.shared_prefix
    params = [p for p in model.parameters() if p.requires_grad]
    res = {}
    for name, fn in (("shared", CausalLMLoss(model, True, True, share_prefix=True)), ("packed", CausalLMLoss(model, True, True, share_prefix=False)),
                     ("ref", CausalLMLoss(model, False, False))):
        loss, _ = fn(b.input_ids, b.attention_mask, b.labels)
        res[name] = (loss.item(), torch.autograd.grad(loss, params))
    for name in ("shared", "packed"):
        assert res[name][0] == pytest.approx(res["ref"][0], rel=1e-5)
        for a, r in zip(res[name][1], res["ref"][1]):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_fused_handles_qkv_bias(tmp_path, tokenizer):
    """Qwen2 layout: biases on q/k/v."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    qcfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    m = Qwen2ForCausalLM(qcfg)
    with torch.no_grad():
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    m.save_pretrained(tmp_path / "qwen", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "qwen")
    built = _lora_model(str(tmp_path / "qwen"), "qv")
    b = collate(_batch(tokenizer, seed=3), tokenizer.pad_token_id)
    params = [p for p in built.model.parameters() if p.requires_grad]
    fast, ref = CausalLMLoss(built.model, True, True), CausalLMLoss(built.model, False, False)
    assert fast.fused is not None, fast.fused_reason
    (lf, nf), (lr, nr) = fast(b.input_ids, b.attention_mask, b.labels), ref(b.input_ids, b.attention_mask, b.labels)
    assert int(nf) == int(nr) == b.n_trained
    assert lf.item() == pytest.approx(lr.item(), rel=1e-5)
    for a, r in zip(torch.autograd.grad(lf, params), torch.autograd.grad(lr, params)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_equals_autograd():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    y = torch.randint(0, 101, (37,))
    loss = linear_cross_entropy(h, w, y, 8)  # 5 chunks
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    g = torch.autograd.grad(2.5 * loss, (h, w))
    gr = torch.autograd.grad(2.5 * ref, (h, w))
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_trim_and_split_keep_loss_and_gradients(model_dir, tokenizer):
    built = _lora_model(model_dir, "qv", seed=2)
    model = built.model
    params = [p for p in model.parameters() if p.requires_grad]
    exs = _batch(tokenizer, n=6, seed=4)
    assert any(trained_length(e) < len(e) for e in exs)
    ref_fn, fast_fn = CausalLMLoss(model, False, False), CausalLMLoss(model, True, True)
    whole = collate(exs, tokenizer.pad_token_id, trim=False)
    loss, n = ref_fn(whole.input_ids, whole.attention_mask, whole.labels)
    g_ref = torch.autograd.grad(loss, params)
    parts = split_by_tokens(exs, 40)
    assert len(parts) > 1 and [e for p in parts for e in p] == exs
    total, n_total = 0.0, 0
    grads = [torch.zeros_like(p) for p in params]
    for part in parts:
        b = collate(part, tokenizer.pad_token_id)  # trimmed
        for fn in (ref_fn, fast_fn):
            l_, n_ = fn(b.input_ids, b.attention_mask, b.labels)
            if fn is fast_fn:
                total += l_.item()
                n_total += int(n_)
                for acc, g in zip(grads, torch.autograd.grad(l_, params)):
                    acc += g
    assert n_total == int(n)
    assert total == pytest.approx(loss.item(), rel=1e-5)
    for a, r in zip(grads, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_dropout_mask_rate_and_eval_mode(model_dir, tokenizer):
    m, inv = _mask((400, 500), 0.05, CPU)
    assert m.dtype == torch.bool and abs(1 - m.float().mean().item() - 0.05) < 0.003
    assert inv == pytest.approx(1 / 0.95, rel=1e-4)
    # in eval mode peft's dropout is off, and so is ours: the fused path is deterministic and exact
    built = _lora_model(model_dir, "qv", dropout=0.3, seed=3)
    model = built.model.eval()
    b = collate(_batch(tokenizer, seed=6), tokenizer.pad_token_id)
    fast, ref = CausalLMLoss(model, True, True), CausalLMLoss(model, False, False)
    with torch.no_grad():
        a1, a2 = fast(b.input_ids, b.attention_mask, b.labels)[0].item(), fast(b.input_ids, b.attention_mask, b.labels)[0].item()
        r = ref(b.input_ids, b.attention_mask, b.labels)[0].item()
    assert a1 == a2 == pytest.approx(r, rel=1e-5)
    # in train mode dropout is applied: the loss moves, and two draws differ
    model.train()
    with torch.no_grad():
        t1, t2 = fast(b.input_ids, b.attention_mask, b.labels)[0].item(), fast(b.input_ids, b.attention_mask, b.labels)[0].item()
    assert t1 != t2 and abs(t1 - r) / r < 0.2


def _fill_lora_b(model) -> None:
    """A trained-looking adapter, the same in every model built from the same config: B != 0,
    seeded by each matrix's size rather than the global RNG."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)


def test_gradient_checkpointing_is_exact_with_dropout(model_dir, tokenizer):
    """train.gradient_checkpointing recomputes each fused layer in backward with the same RNG."""
    b = collate(_batch(tokenizer, seed=10), tokenizer.pad_token_id)
    out = {}
    for gc in (False, True):
        cfg = config_from_dict({"model": {"name": model_dir, "dtype": "fp32"}, "lora": {"rank": 4, "targets": "all-linear", "dropout": 0.1},
                                "train": {"gradient_checkpointing": gc}})
        torch.manual_seed(0)
        model = build_model(cfg, CPU).model
        _fill_lora_b(model)
        fn = CausalLMLoss(model, True, True).train()
        assert fn.fused is not None
        torch.manual_seed(123)
        loss, _ = fn(b.input_ids, b.attention_mask, b.labels)
        params = [p for p in model.parameters() if p.requires_grad]
        out[gc] = (loss.item(), torch.autograd.grad(loss, params))
    assert out[True][0] == out[False][0]
    for a, r in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-9)


def _lora_model_on_bf16_weights(model_dir, dtype: str):
    """LoRA r=4 on all linear layers with B filled (_fill_lora_b); in fp32 the frozen weights are
    the bf16 model's, rounded, so that an fp32 computation is the reference for the bf16 one."""
    cfg = config_from_dict({"model": {"name": model_dir, "dtype": dtype}, "lora": {"rank": 4, "targets": "all-linear", "dropout": 0.0}})
    torch.manual_seed(0)
    model = build_model(cfg, CPU).model
    _fill_lora_b(model)
    if dtype == "fp32":
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad:
                    p.copy_(p.to(torch.bfloat16).float())
    return model


def test_bf16_base_is_as_accurate_as_transformers(model_dir, tokenizer):
    """With a bf16 frozen base (machines with native bf16), the fused path's gradients are as close
    to an fp32 computation on the same weights as the transformers bf16 forward's are."""
    b = collate(_batch(tokenizer, n=3, seed=12), tokenizer.pad_token_id)
    grads = {}
    for dtype in ("bf16", "fp32"):
        model = _lora_model_on_bf16_weights(model_dir, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        for fused in ((True, False) if dtype == "bf16" else (False,)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss, _ = CausalLMLoss(model, fused, fused)(b.input_ids, b.attention_mask, b.labels)
            grads[(dtype, fused)] = torch.autograd.grad(loss, params)

    def err(g):
        return max(((a.float() - r).norm() / r.norm()).item() for a, r in zip(g, grads[("fp32", False)]))

    assert err(grads[("bf16", True)]) <= max(1.5 * err(grads[("bf16", False)]), 1e-3)
    assert err(grads[("bf16", True)]) < 0.05


@pytest.mark.parametrize("below", [0, 20, 10**6], ids=["bf16-backward", "mixed", "fp32-backward"])
def test_bf16_attention_backward_in_fp32_for_short_sequences(model_dir, tokenizer, monkeypatch, below):
    """A bf16 step runs attention backward in fp32 for sequences shorter than FP32_BACKWARD_BELOW
    (faster there, benchmarks/attention_backward.py) and in bf16 for longer ones; every mix gives
    gradients as close to an fp32 computation as the bf16 transformers forward's."""
    from tunelab.kernels import fused_llama

    flash, flash_bwd = fused_llama._flash_ops()
    seen = []

    def spy_bwd(*args, **kw):
        seen.append(args[1].dtype)
        return flash_bwd(*args, **kw)

    monkeypatch.setattr(fused_llama, "_flash_ops", lambda: (flash, spy_bwd))
    monkeypatch.setattr(fused_llama, "FP32_BACKWARD_BELOW", below)
    exs = _batch(tokenizer, n=4, seed=12)
    lengths = [len(e.input_ids) for e in exs]
    b = collate(exs, tokenizer.pad_token_id)
    grads = {}
    for dtype in ("bf16", "fp32"):
        model = _lora_model_on_bf16_weights(model_dir, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, _ = CausalLMLoss(model, dtype == "bf16", dtype == "bf16")(b.input_ids, b.attention_mask, b.labels)
        grads[dtype] = torch.autograd.grad(loss, params)
        if dtype == "bf16":
            used = set(seen)
    want = {torch.float32 if n < below else torch.bfloat16 for n in lengths}
    assert min(lengths) < 20 <= max(lengths)  # the "mixed" case mixes
    assert used == want
    err = max(((a.float() - r).norm() / r.norm()).item() for a, r in zip(grads["bf16"], grads["fp32"]))
    assert err < 0.05


def test_unsupported_models_fall_back(model_dir, tokenizer):
    cfg = config_from_dict({"method": "full", "model": {"name": model_dir, "dtype": "fp32"}})
    built = build_model(cfg, CPU)
    fn = CausalLMLoss(built.model, True, True)
    assert fn.fused is None and "train" in fn.fused_reason
    b = collate(_batch(tokenizer, n=3, seed=8), tokenizer.pad_token_id)
    loss, n = fn(b.input_ids, b.attention_mask, b.labels)  # the transformers decoder path
    ref, _ = CausalLMLoss(copy.deepcopy(built.model), False, False)(b.input_ids, b.attention_mask, b.labels)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.slow
def test_compiled_pointwise_steps_keep_loss_and_gradients(model_dir, tokenizer):
    """train.compile_pointwise: the fused decoder with RMSNorm / SwiGLU through torch.compile gives
    the eager fused path's loss and gradients (fp32: up to reassociated sums), LoRA on down_proj too."""
    from tunelab.kernels.pointwise import EAGER

    built = _lora_model(model_dir, "all-linear")
    model = built.model
    b = collate(_batch(tokenizer), tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for compiled in (False, True):
        fn = CausalLMLoss(model, True, True, compile_pointwise=compiled)
        assert (fn.fused.ops is not EAGER) == compiled
        assert fn.fused_reason == ("on, pointwise steps compiled" if compiled else "on")
        loss, n = fn(b.input_ids, b.attention_mask, b.labels)
        out[compiled] = (loss.item(), torch.autograd.grad(loss / n, params))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    for a, r in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-7)
