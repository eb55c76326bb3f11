"""LoRA adapters: zero-init B (the adapted model starts exactly at the base), where adapters go
(targets presets and layer selection), the rank warning, and fp32 trainable parameters."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from tinymodels import make_tiny_llama
from tunelab.config import config_from_dict
from tunelab.models.adapters import peft_lora_config, resolve_layers
from tunelab.models.build import build_model
from tunelab.models.load import load_model

CPU = torch.device("cpu")
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LORA_NAME = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.")




@pytest.fixture(scope="module")
def three_layer_dir(tmp_path_factory, tokenizer) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny3"), tokenizer, seed=1, layers=3)


def _cfg(model_dir: str, **lora) -> object:
    return config_from_dict({"model": {"name": model_dir, "dtype": "fp32"}, "lora": {"rank": 4, **lora}})


def _adapted(model) -> set[tuple[int, str]]:
    """(layer, module) pairs that carry LoRA A and B matrices."""
    found: dict[tuple[int, str], set[str]] = {}
    for name, _ in model.named_parameters():
        m = LORA_NAME.search(name)
        if m:
            found.setdefault((int(m.group(1)), m.group(2)), set()).add(m.group(3))
    assert all(v == {"A", "B"} for v in found.values()), found
    return set(found)


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])


def test_b_is_zero_and_step0_logits_equal_base_exactly(tiny_model_dir, tokenizer):
    cfg = _cfg(tiny_model_dir, targets="all-linear", dropout=0.1)
    built = build_model(cfg, CPU)
    model = built.model
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora, "no LoRA parameters were created"
    for n, p in lora.items():
        if ".lora_B." in n:
            assert torch.count_nonzero(p) == 0, f"{n} is not zero at init"
        else:
            assert torch.count_nonzero(p) > 0, f"{n} (A) must be random, not zero"

    base = load_model(tiny_model_dir, torch.float32).eval()
    ids = _ids(tokenizer)
    with torch.no_grad():
        want = base(input_ids=ids).logits
        model.eval()
        got_eval = model(input_ids=ids).logits
        model.train()  # dropout active: still exact, B @ dropout(A x) = 0
        got_train = model(input_ids=ids).logits
    assert torch.equal(got_eval, want)
    assert torch.equal(got_train, want)


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("qv", {"q_proj", "v_proj"}),
        ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ("all-linear", ALL_LINEAR),
        (["k_proj", "down_proj"], {"k_proj", "down_proj"}),
    ],
)
def test_target_presets_put_adapters_exactly_there(three_layer_dir, targets, expected):
    model = build_model(_cfg(three_layer_dir, targets=targets), CPU).model
    assert _adapted(model) == {(layer, m) for layer in range(3) for m in expected}
    # all-linear never adapts the (tied) output head or the embeddings
    assert not any("lora_" in n and ("lm_head" in n or "embed" in n) for n, _ in model.named_parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only the LoRA matrices train"


@pytest.mark.parametrize(
    "layers, expected",
    [("all", {0, 1, 2}), ("top:1", {2}), ("top:2", {1, 2}), ([0], {0}), ([0, -1], {0, 2}), ([2, 0, 2], {0, 2})],
)
def test_layers_select_exactly_the_asked_layers(three_layer_dir, layers, expected):
    model = build_model(_cfg(three_layer_dir, targets="qv", layers=layers), CPU).model
    assert _adapted(model) == {(layer, m) for layer in expected for m in ("q_proj", "v_proj")}


@pytest.mark.parametrize("layers, expected", [("top:1", {2}), ([0, 2], {0, 2})])
def test_all_linear_with_a_layer_selection(three_layer_dir, layers, expected):
    # peft refuses layers_to_transform with the string "all-linear": tunelab must name the modules
    model = build_model(_cfg(three_layer_dir, targets="all-linear", layers=layers), CPU).model
    assert _adapted(model) == {(layer, m) for layer in expected for m in ALL_LINEAR}


def test_layer_and_target_errors(three_layer_dir):
    with pytest.raises(ValueError, match="top:4"):
        resolve_layers("top:4", 3)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([3], 3)
    with pytest.raises(ValueError, match="not found"):
        build_model(_cfg(three_layer_dir, targets=["qproj"]), CPU)


def test_rank_above_128_warns(tiny_model_dir):
    base = load_model(tiny_model_dir, torch.float32)
    with pytest.warns(UserWarning, match="128"):
        peft_lora_config(_cfg(tiny_model_dir, rank=129), base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lc = peft_lora_config(_cfg(tiny_model_dir, rank=128), base)
    assert lc.r == 128 and lc.lora_alpha == 256  # alpha defaults to 2 x rank


def test_trainable_params_are_fp32_on_a_bf16_base(tiny_model_dir, tokenizer):
    cfg = config_from_dict({"model": {"name": tiny_model_dir, "dtype": "bf16"}, "lora": {"targets": "all-linear", "rank": 4}})
    built = build_model(cfg, CPU)
    assert built.compute_dtype == torch.bfloat16
    model = built.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values()), {n: p.dtype for n, p in trainable.items()}
    assert any(p.dtype == torch.bfloat16 for p in frozen.values()), "the frozen base should stay in bf16"
    # a training step under autocast keeps fp32 gradients on the fp32 master weights
    ids = _ids(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in trainable.values()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(torch.count_nonzero(g) > 0 for g in grads)
