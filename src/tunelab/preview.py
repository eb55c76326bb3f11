"""``tunelab preview``: rendered training examples with the trained tokens highlighted, fitted
to ``data.max_seq_len`` as training fits them (dropped and cut records are marked)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.text import Text

from .config import Config
from .data.pipeline import prepare_conversations
from .data.render import Renderer
from .data.truncation import summary_from_stats

STATUS_STYLE = {"kept": "", "truncated": "bold yellow", "dropped": "bold red"}


def preview(cfg: Config, renderer: Renderer, n: int = 3, as_json: bool = False, console: Any = None) -> list[dict]:
    train, _, _, _ = prepare_conversations(cfg)
    d = cfg.data
    out = []
    console = console or Console()
    for conv in train[:n]:
        seg = renderer.segments(conv, d.max_seq_len, d.truncation)
        seg["source"] = conv.source
        out.append(seg)
        if as_json:
            print(json.dumps(seg, ensure_ascii=False))
            continue
        t = Text()
        for s in seg["segments"]:
            t.append(s["text"], style="bold green on grey15" if s["trained"] else "dim")
        status = seg["status"]
        mark = {"kept": "", "truncated": f"  TRUNCATED from {seg['n_tokens_full']} to max_seq_len {d.max_seq_len} ({d.truncation})",
                "dropped": f"  DROPPED: {seg['n_tokens_full']} tokens > max_seq_len {d.max_seq_len} (truncation: {d.truncation}); not trained"}[status]
        console.rule(f"{conv.source}  tokens {seg['n_tokens']}  trained {seg['n_trained']}", style="")
        if mark:
            console.print(Text(mark.strip(), style=STATUS_STYLE[status]), soft_wrap=True)
        console.print(t)
    if cfg.data.replay is not None:
        out.append(_replay(cfg, renderer, as_json, console))
    if not as_json:
        console.print(f"[dim]template: {renderer.template_name}[/dim]", highlight=False, soft_wrap=True)
        _, stats = renderer.encode_many(train, d.max_seq_len, d.truncation, check_parity=False)
        summary = summary_from_stats(stats, d.max_seq_len, d.truncation)
        console.print(Text(("warning: " if summary.warn else "") + summary.line("train"), style="yellow" if summary.warn else ""), soft_wrap=True)
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
