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
    if not as_json:
        console.print(f"[dim]template: {renderer.template_name}[/dim]", highlight=False, soft_wrap=True)
        console.print("[dim]dim = masked (label -100); [bold green]green[/bold green] = trained[/dim]")
    return out
