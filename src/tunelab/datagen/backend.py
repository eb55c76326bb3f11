"""Where generations come from: a local run or model loaded in-process, or an OpenAI-compatible
endpoint (``tunelab serve``, vLLM, OpenAI, ...) through the official ``openai`` client.

Both complete a batch of chat conversations; the endpoint gets them as concurrent requests
(``--concurrency``), and its 429/503 answers are retried with backoff by the client.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

from ..config import ConfigError
from ..models.load import EMBEDDED_ALIASES

DEFAULT_MODEL = next(iter(EMBEDDED_ALIASES))


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


class Backend(Protocol):
    name: str

    def complete(self, conversations: Sequence[list[dict]], sampling: Sampling, on_done: Optional[Callable[[], None]] = None) -> list[str]:
        """The next assistant turn of each conversation; ``on_done()`` after each one."""


class LocalBackend:
    """A run dir or anything ``model.name`` accepts, generating with ``tunelab generate``'s code."""

    def __init__(self, run_or_model: str, template: Optional[str] = None):
        from ..infer.generate import load_for_inference
        from ..models.load import ModelError

        try:
            self.loaded = load_for_inference(run_or_model, template)
        except ModelError as e:
            raise ConfigError(f"--model: {e}") from None
        self.name = run_or_model

    def complete(self, conversations: Sequence[list[dict]], sampling: Sampling, on_done: Optional[Callable[[], None]] = None) -> list[str]:
        from ..infer.generate import generate

        out = []
        for conv in conversations:
            out += generate(self.loaded, [conv], sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.stop)
            if on_done:
                on_done()
        return out


class OpenAIBackend:
    """An OpenAI-compatible chat endpoint; the API key comes from the environment variable named."""

    def __init__(self, base_url: str, model_name: str, api_key_env: Optional[str] = None, concurrency: int = 4, timeout: float = 600.0,
                 max_retries: int = 8):
        import openai

        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is not set; export it or drop the flag")
        else:
            key = "unused"  # local servers (tunelab serve) take any key
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)
        self.name = model_name
        self.base_url = base_url
        self.concurrency = max(1, concurrency)

    def _one(self, conv: list[dict], s: Sampling) -> str:
        import openai

        try:
            r = self.client.chat.completions.create(model=self.name, messages=conv, max_tokens=s.max_tokens, temperature=s.temperature,
                                                    top_p=s.top_p, stop=list(s.stop[:4]) or None)
        except openai.APIConnectionError as e:
            raise ConfigError(f"--base-url {self.base_url}: cannot connect ({e}); is the server running?") from None
        except openai.APIStatusError as e:
            raise ConfigError(f"--base-url {self.base_url}: the server answered {e.status_code}: {e.message}") from None
        return r.choices[0].message.content or ""

    def complete(self, conversations: Sequence[list[dict]], sampling: Sampling, on_done: Optional[Callable[[], None]] = None) -> list[str]:
        def one(c: list[dict]) -> str:
            text = self._one(c, sampling)
            if on_done:
                on_done()
            return text

        if len(conversations) <= 1 or self.concurrency == 1:
            return [one(c) for c in conversations]
        with ThreadPoolExecutor(min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(one, conversations))


def add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (in-process, or an OpenAI-compatible endpoint)")
    g.add_argument("--model", help=f"a run dir or model loaded in-process (default: {DEFAULT_MODEL}, the embedded model)")
    g.add_argument("--template", help="template for an in-process model (default: the run's)")
    g.add_argument("--base-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (tunelab serve)")
    g.add_argument("--model-name", help="the model id the endpoint serves (GET /v1/models); with --base-url")
    g.add_argument("--api-key-env", metavar="VAR", help="environment variable that holds the endpoint's API key")
    g.add_argument("--concurrency", type=int, default=4, help="concurrent requests to the endpoint (default 4)")


def backend_from_args(args: argparse.Namespace) -> Backend:
    if args.base_url:
        if args.model:
            raise ConfigError("give either --model (in-process) or --base-url with --model-name (an endpoint), not both")
        if not args.model_name:
            raise ConfigError("--base-url needs --model-name NAME (the id the endpoint lists under /v1/models)")
        return OpenAIBackend(args.base_url, args.model_name, args.api_key_env, args.concurrency)
    if args.model_name or args.api_key_env:
        raise ConfigError("--model-name and --api-key-env go with --base-url URL")
    return LocalBackend(args.model or DEFAULT_MODEL, args.template)
