"""Shared fixtures: a real tokenizer (the embedded SmolLM2's) and tiny random Llama models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tinymodels import make_learnable_llama, make_tiny_llama, write_jsonl  # noqa: F401

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA
