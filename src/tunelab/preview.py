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
    if not as_json:
        console.print(f"[dim]template: {renderer.template_name}[/dim]", highlight=False, soft_wrap=True)
        _, stats = renderer.encode_many(train, d.max_seq_len, d.truncation, check_parity=False)
        summary = summary_from_stats(stats, d.max_seq_len, d.truncation)
        console.print(Text(("warning: " if summary.warn else "") + summary.line("train"), style="yellow" if summary.warn else ""), soft_wrap=True)
        console.print("[dim]dim = masked (label -100); [bold green]green[/bold green] = trained[/dim]")
    return out
