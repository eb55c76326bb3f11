"""``tunelab serve RUN_OR_MODEL``: load the run once, then serve it with uvicorn.

The socket is bound before uvicorn starts, so ``--port 0`` picks a free port and the line
``tunelab serve: listening on http://HOST:PORT/v1`` names the real one.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import ConfigError
from ..infer.generate import Loaded, generate_one, load_for_inference
from ..models.load import ModelError
from .app import Engine, build_app
from .protocol import ChatRequest


def served_name(run_or_model: str) -> str:
    p = Path(run_or_model)
    return p.resolve().name if p.exists() else run_or_model


def engine_for(loaded: Loaded, max_queue: int = 16) -> Engine:
    """An engine whose generations are exactly ``tunelab generate``'s (same renderer, same stop)."""
    import torch

    def gen(req: ChatRequest, i: int, on_text: Optional[Callable[[str], None]], cancelled: threading.Event) -> Any:
        if req.seed is not None:
            torch.manual_seed(req.seed + i)
        return generate_one(loaded, req.messages, req.max_tokens, req.temperature, req.top_p, req.stop, on_text, cancelled)

    return Engine(gen, max_queue)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"serve: cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(run_or_model: str, host: str = "127.0.0.1", port: int = 8000, template: Optional[str] = None, model_name: Optional[str] = None,
          max_queue: int = 16, max_tokens_limit: int = 2048) -> None:
    import uvicorn

    sock = bind(host, port)  # first: a taken port fails before the model loads
    try:
        loaded = load_for_inference(run_or_model, template)
    except ModelError as e:
        sock.close()
        raise ConfigError(f"serve: {e}") from None
    name = model_name or served_name(run_or_model)
    engine = engine_for(loaded, max_queue)
    app = build_app(engine, name, max_tokens_limit, {"template": loaded.renderer.template_name, "device": str(loaded.device)})
    h, p = sock.getsockname()[:2]
    shown = f"[{h}]" if ":" in h else h
    print(f"tunelab serve: {name} (template {loaded.renderer.template_name}) listening on http://{shown}:{p}/v1", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
        print("tunelab serve: stopped", file=sys.stderr, flush=True)
