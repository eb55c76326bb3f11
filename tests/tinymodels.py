"""Helpers shared by the tests: tiny random Llama models and small data files.

A module with its own name (not ``conftest``): with several conftest.py files in the tree,
``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_small_bpe_tokenizer(out: Path):
    """A real byte-level BPE tokenizer (the kind SmolLM2, Llama 3 and Qwen2 use) with a vocab of
    a few hundred tokens, trained on a few sentences: for tests whose cost grows with the vocab
    (a GGUF reader parses every token and merge string)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = ["The quick brown fox jumps over the lazy dog. Name a number after 41. It is 42, the answer. " * 3,
            "def add(a, b):\n    return a + b\n", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\nParis."]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.save_pretrained(out)
    return tok


# Unit roundoff of each compute dtype: a dtype-sensitive test's tolerance is a multiple of it, so
# a bf16 run is held to bf16 precision and an fp32 run to fp32 precision (tests/conftest.py).
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8}


def dtype_tolerance(name: str, ulps: float) -> float:
    """``ulps`` units of roundoff of compute dtype ``name`` (relative)."""
    return ulps * UNIT_ROUNDOFF[name]
