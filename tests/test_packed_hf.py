"""The transformers-forward fast path (the path on GPUs): padding-free packing + trained-only logits.

Examples are packed into one row with position_ids restarting at each example; transformers'
masking utilities keep attention within each example. On CPU it runs when the fused decoder is off
(``train.fused_decoder: false``). Its loss and gradients must equal the padded, unpacked reference
(full logits) on batches of very unequal lengths: atol 1e-5 in fp32 (only summation order differs).
"""

from __future__ import annotations

import pytest
import torch

from tinymodels import make_tiny_llama
from tunelab.config import ConfigError, config_from_dict
from tunelab.data.batching import collate
from tunelab.data.render import IGNORE, EncodedExample
from tunelab.models.build import build_model
from tunelab.models.load import load_model
from tunelab.train.loss import CausalLMLoss, packed_forward_unsupported

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-packed"), tokenizer, seed=7, layers=2, hidden=64)


def _lora(model_dir, attn="sdpa", dropout=0.0):
    cfg = config_from_dict({"model": {"name": model_dir, "dtype": "fp32", "attn_implementation": attn},
                            "lora": {"rank": 4, "targets": "all-linear", "dropout": dropout}})
    torch.manual_seed(0)
    built = build_model(cfg, CPU)
    with torch.no_grad():  # B != 0 so every adapter matrix gets a gradient
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return built.model


def _unequal_batch(seed=0):
    """Lengths 2..90: one example is ~40x another, so padding would dominate a padded batch."""
    g = torch.Generator().manual_seed(seed)
    exs = []
    for L in (2, 90, 7, 55, 3, 31):
        ids = torch.randint(10, 3000, (L,), generator=g).tolist()
        start = max(1, L // 3)
        exs.append(EncodedExample(ids, [IGNORE] * start + ids[start:]))
    return exs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_padded_reference(model_dir, tokenizer, attn):
    model = _lora(model_dir, attn)
    b = collate(_unequal_batch(), tokenizer.pad_token_id, trim=False)
    assert (b.attention_mask == 0).float().mean() > 0.4  # mostly padding
    packed = CausalLMLoss(model, True, fused_decoder=False)
    assert packed.padding_free and packed.path.startswith("packed HF forward + trained-only logits (cpu)"), packed.path
    ref = CausalLMLoss(model, False, False)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name, fn in (("packed", packed), ("ref", ref)):
        loss, n = fn(b.input_ids, b.attention_mask, b.labels)
        out[name] = (loss, int(n), torch.autograd.grad(loss, params))
    assert out["packed"][1] == out["ref"][1] == b.n_trained
    torch.testing.assert_close(out["packed"][0], out["ref"][0], atol=1e-5, rtol=1e-6)
    for a, r in zip(out["packed"][2], out["ref"][2]):
        assert torch.count_nonzero(r) > 0
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


def test_padding_free_off_is_the_padded_forward(model_dir, tokenizer):
    model = _lora(model_dir)
    fn = CausalLMLoss(model, True, fused_decoder=False, padding_free=False)
    assert not fn.padding_free and fn.path.startswith("padded HF forward") and "train.padding_free: false" in fn.path
    b = collate(_unequal_batch(1), tokenizer.pad_token_id)
    loss, _ = fn(b.input_ids, b.attention_mask, b.labels)
    ref, _ = CausalLMLoss(model, False, False)(b.input_ids, b.attention_mask, b.labels)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)


def test_the_probe_catches_a_decoder_that_ignores_position_restarts(model_dir, monkeypatch):
    """If a model let packed examples attend to each other, packing would silently change the
    loss: the probe must refuse it (simulated by disabling transformers' packed-sequence detection)."""
    import transformers.masking_utils as mu

    lm = load_model(model_dir, torch.float32)
    assert packed_forward_unsupported(lm) == ""
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    why = packed_forward_unsupported(lm)
    assert "attend to each other" in why
    fn = CausalLMLoss(lm, True, fused_decoder=False)
    assert not fn.padding_free and "padding-free off" in fn.path


def test_the_path_is_named(model_dir):
    model = _lora(model_dir)
    assert CausalLMLoss(model, True, True).path.startswith("fused CPU decoder")
    assert CausalLMLoss(model, False, False).path.startswith("reference: full logits")
    on_meta = CausalLMLoss(_lora(model_dir).to("meta"), True, True)
    assert on_meta.fused is None and "device meta" in on_meta.path


def test_liger_is_refused_off_cuda_with_the_fix(model_dir):
    model = _lora(model_dir)
    with pytest.raises(ConfigError, match="liger"):
        CausalLMLoss(model, True, kernels="liger")
