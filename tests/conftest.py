"""Shared fixtures: a real tokenizer (the embedded SmolLM2's) and tiny random Llama models.

Compute dtype. ``model.dtype: auto`` is bf16 on a CPU with avx512_bf16 or AMX and fp32
elsewhere, so a test whose numbers depend on the dtype must not rely on ``auto``: it takes
the ``compute_dtype_name`` fixture, puts it in its config (``model.dtype``) and derives its
tolerance from it (``tinymodels.dtype_tolerance``). Such tests are marked ``dtype_sensitive``
automatically. ``TUNELAB_TEST_DTYPE=bf16|fp32`` sets that fixture, and also forces what
``auto`` resolves to in-process (bf16 is emulated on AVX2-only CPUs: slow, but exact for
tiny models); unset, the fixture is fp32 and ``auto`` is the hardware's choice. ``.ci/run``
runs the ``dtype_sensitive`` subset both ways.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tinymodels import dtype_tolerance, make_learnable_llama, make_tiny_llama, write_jsonl  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny models are dominated by per-op overhead: one intra-op thread is several times faster
# than two on a busy 2-core machine (the threads wait on each other), and never slower.
torch.set_num_threads(1)

TEST_DTYPE = os.environ.get("TUNELAB_TEST_DTYPE") or None
if TEST_DTYPE not in (None, "bf16", "fp32"):
    raise pytest.UsageError(f"TUNELAB_TEST_DTYPE={TEST_DTYPE!r}: use bf16 or fp32")

def pytest_collection_modifyitems(config, items):
    for item in items:
        if "compute_dtype_name" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.dtype_sensitive)


@pytest.fixture
def compute_dtype_name() -> str:
    """The compute dtype a dtype-sensitive test sets in its config: TUNELAB_TEST_DTYPE, else fp32."""
    return TEST_DTYPE or "fp32"


@pytest.fixture(autouse=True)
def _forced_auto_dtype(monkeypatch):
    """With TUNELAB_TEST_DTYPE set, ``model.dtype: auto`` resolves to it in this process."""
    if TEST_DTYPE is not None:
        import tunelab.models.load as load

        monkeypatch.setattr(load, "bf16_supported", lambda device: TEST_DTYPE == "bf16")
    yield


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
