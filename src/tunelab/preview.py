"""``tunelab preview``: rendered training examples with the trained tokens highlighted."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.text import Text

from .config import Config
from .data.pipeline import prepare_conversations
from .data.render import Renderer


def preview(cfg: Config, renderer: Renderer, n: int = 3, as_json: bool = False, console: Any = None) -> list[dict]:
    train, _, _, _ = prepare_conversations(cfg)
    out = []
    console = console or Console()
    for conv in train[:n]:
        seg = renderer.segments(conv)
        out.append(seg)
        if as_json:
            print(json.dumps(seg, ensure_ascii=False))
            continue
        t = Text()
        for s in seg["segments"]:
            t.append(s["text"], style="bold green on grey15" if s["trained"] else "dim")
        console.rule(f"{conv.source}  tokens {seg['n_tokens']}  trained {seg['n_trained']}")
        console.print(t)
    if cfg.data.replay is not None:
        out.append(_replay(cfg, renderer, as_json, console))
    if not as_json:
        console.print("[dim]dim = masked (label -100); [bold green]green[/bold green] = trained[/dim]")
    return out


def _replay(cfg: Config, renderer: Renderer, as_json: bool, console: Any) -> dict:
    """data.replay: the share it makes of the trained tokens, and its first record (all trained)."""
    import copy

    from .data.formats import load_dataset_file
    from .data.pipeline import prepare_data

    stats = prepare_data(cfg, renderer).replay
    first = load_dataset_file(cfg.data.replay.path, cfg.data.replay.format, cfg.data.on_error).conversations[:1]
    every = copy.copy(renderer)
    every.train_on = "all"  # replay records carry LM loss on all their tokens (data/replay.py)
    seg = every.segments(first[0]) if first else {"segments": [], "n_tokens": 0, "n_trained": 0}
    row = {"replay": stats.summary(), "achieved": stats.achieved, "examples": stats.records, **seg}
    if as_json:
        print(json.dumps(row, ensure_ascii=False))
        return row
    console.rule(stats.summary())
    t = Text()
    for s in seg["segments"][:1]:
        t.append(s["text"][:2000], style="bold green on grey15" if s["trained"] else "dim")
    console.print(t)
    return row
