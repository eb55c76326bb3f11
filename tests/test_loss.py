"""The training loss is the mean over every trained token of the effective batch.

Not a mean of per-example means (which over-weights short completions) and not skewed by
gradient accumulation: batch 2 x accum 2 gives the gradients of batch 4 x accum 1. The
trained-logits-only fast path equals the full-logits path for loss and gradients.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from tinymodels import write_jsonl
from tunelab.config import config_from_dict
from tunelab.data.batching import collate
from tunelab.data.pipeline import prepare_data
from tunelab.data.render import IGNORE, Renderer
from tunelab.models.build import build_model
from tunelab.train.loss import CausalLMLoss
from tunelab.train.recipe import train

CPU = torch.device("cpu")
_AdamW = torch.optim.AdamW




class RecordingAdamW(_AdamW):
    """AdamW that records (parameters, gradients) as they are when ``step`` is called."""

    records: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        RecordingAdamW.records.append(([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params]))
        return super().step(closure)


@pytest.fixture
def mixed_lengths(tmp_path) -> Path:
    """Completions of very different lengths: 1-2 tokens vs ~60 tokens."""
    long = " ".join(f"word{i}" for i in range(30))
    return write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "Say yes.", "output": "yes"},
        {"instruction": "List the words.", "output": long},
        {"instruction": "Say no.", "output": "no"},
        {"instruction": "List them again, please.", "output": long + " done"},
    ])


def _cfg(model_dir: str, data: Path, out: Path, **train_kw) -> object:
    return config_from_dict({
        "name": out.name, "output_dir": str(out),
        "model": {"name": model_dir, "dtype": "fp32"},
        "data": {"train": [{"path": str(data)}], "audit": "off"},
        "lora": {"rank": 4, "targets": "all-linear", "dropout": 0.0},
        "train": {"max_steps": 1, "lr": 1e-3, "warmup": 0.0, "max_grad_norm": None, "seed": 3, **train_kw},
    })


def _reference(cfg, params: list[torch.Tensor]) -> tuple[dict[str, float], dict[str, list[torch.Tensor]]]:
    """Loss and gradients recomputed example by example (no padding, full logits) from the
    given trainable parameters: the token mean, and the mean of per-example means."""
    built = build_model(cfg, CPU)
    model = built.model.eval()  # dropout is 0 anyway
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, v in zip(trainable, params, strict=True):
            p.copy_(v)
    data = prepare_data(cfg, Renderer(built.tokenizer, cfg.template))
    sums, counts = [], []
    for ex in data.train:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor(ex.labels[1:])
        logits = model(input_ids=ids).logits[0, :-1].float()
        sums.append(F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"))
        counts.append(int((labels != IGNORE).sum()))
    assert max(counts) > 10 * min(counts), counts  # the point: very different lengths
    out_loss, out_grads = {}, {}
    for kind, loss in (("token_mean", sum(sums) / sum(counts)), ("example_mean", sum(s / c for s, c in zip(sums, counts)) / len(counts))):
        grads = torch.autograd.grad(loss, trainable, retain_graph=True)
        out_loss[kind], out_grads[kind] = loss.item(), [g.detach() for g in grads]
    return out_loss, out_grads


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol=1e-4, atol=1e-8) -> bool:
    return all(torch.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(a, b, strict=True))


def test_grad_accum_equals_big_batch_and_is_the_token_mean(tmp_path, tiny_model_dir, mixed_lengths, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    runs = {}
    for name, bs, ga in (("big", 4, 1), ("accum", 2, 2)):
        RecordingAdamW.records = []
        cfg = _cfg(tiny_model_dir, mixed_lengths, tmp_path / name, batch_size=bs, grad_accum=ga)
        res = train(cfg, console=Console(file=io.StringIO()))
        assert len(RecordingAdamW.records) == 1
        runs[name] = (cfg, res, *RecordingAdamW.records[0])

    cfg, res_big, params, g_big = runs["big"]
    _, res_acc, params_acc, g_acc = runs["accum"]
    assert _close(params, params_acc, 0, 0), "both runs start from the same seeded adapter"
    assert any(torch.count_nonzero(g) > 0 for g in g_big)

    # 1. the same gradients, and so the same update
    # fp32 rounding only: one pass of 4 examples vs two of 2 sum in another order, and the
    # kernels block differently by shape (AVX-512/AMX: up to 4.5e-8 on gradients of 0.13,
    # measured). atol follows the gradient scale; a wrong normalization is off by whole percents.
    scale = max(float(g.abs().max()) for g in g_big)
    assert _close(g_big, g_acc, rtol=1e-5, atol=1e-6 * scale)
    assert res_big.losses[0] == pytest.approx(res_acc.losses[0], rel=1e-6)
    a_big = load_file(str(tmp_path / "big" / "adapter" / "adapter_model.safetensors"))
    a_acc = load_file(str(tmp_path / "accum" / "adapter" / "adapter_model.safetensors"))
    assert a_big.keys() == a_acc.keys()
    for k in a_big:
        torch.testing.assert_close(a_big[k], a_acc[k], rtol=0, atol=1e-6)

    # 2. ... and they are those of the mean over all trained tokens, computed independently
    ref_loss, ref_grads = _reference(cfg, params)
    assert res_big.losses[0] == pytest.approx(ref_loss["token_mean"], rel=1e-5)
    assert _close(g_big, ref_grads["token_mean"], rtol=1e-4, atol=1e-8)
    # the test can tell: a mean of per-example means would give other numbers
    assert not _close(g_big, ref_grads["example_mean"], rtol=1e-2, atol=1e-6)


# Every fast path the loss module offers: its default, and the plain trained-logits-only path
# when a fused decoder is the default.
FAST_PATHS = {"default": {}}
if "fused_decoder" in inspect.signature(CausalLMLoss.__init__).parameters:
    FAST_PATHS["unfused"] = {"fused_decoder": False}


@pytest.mark.parametrize("fast_kw", list(FAST_PATHS.values()), ids=list(FAST_PATHS))
def test_trained_logits_only_equals_full_logits(tiny_model_dir, mixed_lengths, tmp_path, fast_kw):
    cfg = _cfg(tiny_model_dir, mixed_lengths, tmp_path / "run")
    built = build_model(cfg, CPU)
    model = built.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    data = prepare_data(cfg, Renderer(built.tokenizer, cfg.template))
    batch = collate(data.train, built.tokenizer.pad_token_id)
    assert (batch.attention_mask == 0).any(), "the batch should hold padding"
    trainable = [p for p in model.parameters() if p.requires_grad]

    results = {}
    for fast in (True, False):
        loss_fn = CausalLMLoss(model, trained_logits_only=True, **fast_kw) if fast else CausalLMLoss(model, trained_logits_only=False)
        loss_sum, n = loss_fn(batch.input_ids, batch.attention_mask, batch.labels)
        mean = loss_sum / n
        results[fast] = (mean.item(), int(n), torch.autograd.grad(mean, trainable))
    (m_fast, n_fast, g_fast), (m_full, n_full, g_full) = results[True], results[False]
    assert n_fast == n_full == batch.n_trained == sum(ex.n_trained for ex in data.train) - sum(ex.labels[0] != IGNORE for ex in data.train)
    assert m_fast == pytest.approx(m_full, abs=1e-5)
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert any(torch.count_nonzero(g) > 0 for g in g_fast)

    # and both equal the per-example sum without padding: padding is masked by position
    with torch.no_grad():
        total = 0.0
        for ex in data.train:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
            total += F.cross_entropy(logits, torch.tensor(ex.labels[1:]), ignore_index=IGNORE, reduction="sum").item()
    assert m_fast == pytest.approx(total / n_fast, rel=1e-5)
