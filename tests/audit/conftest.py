"""Fixtures of the audit tests: renderers on the shared tokenizer, the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from audit_helpers import SHARED


@pytest.fixture(scope="session")
def chatml(tokenizer):
    """The embedded SmolLM2 tokenizer with the plain ChatML template (no default system prompt)."""
    from tunelab.data.render import Renderer

    return Renderer(tokenizer, "chatml")


@pytest.fixture(scope="session")
def auto_renderer(tokenizer):
    from tunelab.data.render import Renderer

    return Renderer(tokenizer, "auto")


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED
