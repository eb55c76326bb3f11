"""Forgetting: the base model against the tuned one on general data (docs/practices.md#overfit-forgetting).

Raw text (``{"text": ...}``) is scored by perplexity over all its tokens, in windows of
``max_seq_len``; instruction data by the loss on its completions, and exact match too when
its completions are short (a median of at most 8 words). Reports base, tuned and the delta
(tuned - base: a higher perplexity or loss, a lower exact match, is forgetting).
"""

from __future__ import annotations

import gc
import math
import statistics
from pathlib import Path
from typing import Callable, Optional

from ..data.formats import load_dataset_file
from ..data.replay import windows
from ..infer.generate import Loaded, load_for_inference
from .core import items_from, loss_on, score

SHORT_COMPLETION_WORDS = 8


def measure(loaded: Loaded, path: str, max_n: int = 200, max_seq_len: int = 1024, batch_size: int = 16,
            on_batch: Optional[Callable[[int], None]] = None) -> dict:
    convs = load_dataset_file(path).conversations[:max_n]
    texts = [c for c in convs if c.is_text]
    if len(texts) == len(convs):
        encoded, _ = loaded.renderer.encode_many(texts, None, "drop")
        examples = [w for e in encoded for w in windows(e, max_seq_len)]
        loss = loss_on(loaded, examples)
        return {"kind": "text", "records": len(convs), "tokens": sum(e.n_trained for e in examples), "loss": loss, "ppl": _exp(loss)}
    items = items_from(convs)
    short = statistics.median(len(r.split()) for it in items for r in it.refs) <= SHORT_COMPLETION_WORDS
    s = score(loaded, items, ["loss"] + (["em"] if short else []), batch_size=batch_size, max_seq_len=max_seq_len, on_batch=on_batch)
    return {"kind": "instruction", "records": len(convs), **s.metrics}


def _exp(x: float) -> float:
    return math.exp(x) if math.isfinite(x) and x < 700 else float("inf")


def retention(run_dir: str, path: str, max_n: int = 200, batch_size: int = 16, on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Base vs tuned on ``path``; the run dir's base model and its trained result."""
    if not (Path(run_dir) / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: --retention compares a run with its base model; give a run dir")
    out: dict = {"file": path}
    for side, adapter in (("base", False), ("tuned", True)):
        loaded = load_for_inference(run_dir, adapter=adapter)
        out[side] = measure(loaded, path, max_n, loaded.config.data.max_seq_len, batch_size, on_batch)
        del loaded
        gc.collect()
    out["kind"] = out["base"]["kind"]
    out["delta"] = {k: out["tuned"][k] - out["base"][k] for k in ("loss", "ppl", "em") if k in out["base"]}
    return out
