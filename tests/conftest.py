"""Shared fixtures: a real tokenizer (the embedded SmolLM2's) and tiny random Llama models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny models are dominated by per-op overhead: one intra-op thread is several times faster
# than two on a busy 2-core machine (the threads wait on each other), and never slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """The embedded model's dir (converted once from its GGUF and cached)."""
    from tunelab.models.load import ModelError, resolve_model_path

    try:
        return resolve_model_path("smollm2-135m-instruct")
    except ModelError as e:  # the dev install brings it; say how if it is missing
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from tunelab.models.load import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def make_tiny_llama(out: Path, tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def make_learnable_llama(out: Path, tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64, init_range: float = 0.2) -> str:
    """A tiny random Llama that LoRA can teach: its frozen tied embeddings tell tokens apart
    (std 0.2, not 0.02, else logits are near-uniform), and no pad_token_id, because
    transformers zeroes the pad row, which (pad == <|im_end|>) would pin the end-of-turn
    logit at 0 for good."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=init_range, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA
