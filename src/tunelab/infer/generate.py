"""Load a run (or a model) for inference, and generate with the training template.

Prompts are rendered by the same :class:`Renderer` used in training, so the format at
inference is the training format (docs/practices.md#data-format-match). Decoding is greedy by default and stops at
the end-of-turn token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..config import Config, load_config
from ..data.render import Renderer
from ..models.generation import cut_at_markers as _cut
from ..models.generation import greedy_batched
from ..models.load import compute_dtype, load_model, load_tokenizer, resolve_model_path


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    renderer: Renderer
    device: torch.device
    config: Optional[Config] = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(run_or_model: str, template: Optional[str] = None, device: Optional[torch.device] = None, adapter: bool = True) -> Loaded:
    """A run dir (config.yaml + adapter/ or model/) or anything ``model.name`` accepts.

    ``adapter=False`` loads the run's base model alone (the "before" of a run).
    """
    device = device or default_device()
    p = Path(run_or_model)
    if (p / "config.yaml").exists():
        cfg, _ = load_config(p / "config.yaml")
        dtype = compute_dtype(cfg.model.dtype, device)
        trained = p / ("model" if cfg.method == "full" else "adapter")
        if adapter and cfg.method == "full" and trained.exists():
            model = load_model(str(trained), dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation, allow_pickle=cfg.model.allow_pickle)
            tok = load_tokenizer(str(trained), cfg.model.trust_remote_code)
        else:
            base = resolve_model_path(cfg.model.name)
            model = load_model(base, dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation, _qconfig(cfg, dtype), allow_pickle=cfg.model.allow_pickle)
            tok = load_tokenizer(base, cfg.model.trust_remote_code)
            if adapter and cfg.method != "full":
                if not (trained / "adapter_config.json").exists():
                    raise FileNotFoundError(f"{trained}: no adapter yet; train the run first")
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(trained))
        if cfg.method == "qlora":
            from ..models.quantize import honour_compute_dtype, place_on

            honour_compute_dtype(model, dtype)
            place_on(model, device)  # the NF4 base loads onto the current CUDA device or the CPU: move only if elsewhere
        else:
            model.to(device)
        return Loaded(model.eval(), tok, Renderer(tok, template or cfg.template, cfg.data.train_on), device, cfg)
    path = resolve_model_path(run_or_model)
    model = load_model(path, compute_dtype("auto", device)).to(device).eval()
    tok = load_tokenizer(path)
    return Loaded(model, tok, Renderer(tok, template or "auto"), device)


def _qconfig(cfg: Config, dtype: torch.dtype) -> Any:
    from ..models.build import quantization_config

    return quantization_config(cfg, dtype)


@dataclass
class Completion:
    """One generated assistant turn: its text (cut at the end of turn or a stop string)."""

    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int


class _TextStream:
    """A ``model.generate`` streamer that hands out text as it becomes final.

    Text is held back while it could still be the start of an end-of-turn marker or a stop
    string, so what has been handed out is always a prefix of the final completion; the rest
    comes with ``finish``. ``cancelled`` (set from another thread) stops generation.
    """

    def __init__(self, tokenizer: Any, markers: Sequence[str], on_text: Optional[Callable[[str], None]], cancelled: Optional[threading.Event] = None):
        self.tok, self.markers, self.on_text = tokenizer, tuple(markers), on_text
        self.hold = max((len(m) for m in self.markers), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.cancelled = cancelled or threading.Event()

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call is the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        if self.on_text is None:
            return
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if _cut(text, self.markers) < len(text):
            return  # a marker is complete: the rest comes with finish()
        safe = text[: max(len(text) - self.hold, 0)].lstrip().rstrip()
        if safe.endswith("\ufffd"):  # half a multi-byte character
            return
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.on_text(safe[len(self.sent):])
            self.sent = safe

    def end(self) -> None:
        pass

    def finish(self, final: str) -> None:
        if self.on_text is not None and final.startswith(self.sent) and len(final) > len(self.sent):
            self.on_text(final[len(self.sent):])


class _StopCriterion:
    """Ends generation at an end-of-turn marker or a stop string that spans several tokens (by
    decoding the last few tokens), or once the stream is cancelled. Cheaper than
    ``stop_strings``, whose set-up scans the whole vocabulary on every call."""

    def __init__(self, stream: _TextStream, prompt_len: int):
        self.stream, self.prompt_len = stream, prompt_len
        self.window = max((len(m) for m in stream.markers), default=0) + 4

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        done = self.stream.cancelled.is_set()
        if not done and self.stream.markers:
            tail = input_ids[0, max(self.prompt_len, input_ids.shape[1] - self.window):].tolist()
            text = self.stream.tok.decode(tail, skip_special_tokens=False)
            done = any(m in text for m in self.stream.markers)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_one(loaded: Loaded, messages: Sequence[dict], max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] = (), on_text: Optional[Callable[[str], None]] = None,
                 cancelled: Optional[threading.Event] = None) -> Completion:
    """Complete one conversation's next assistant turn. Greedy when temperature == 0.

    Stops at the template's end of turn, or at any of ``stop`` (not included in the text).
    ``on_text`` receives the completion piece by piece as it becomes final (streaming); the
    pieces joined equal ``Completion.text``. Setting ``cancelled`` (from another thread) ends the
    generation early.
    """
    from transformers import StoppingCriteriaList

    r = loaded.renderer
    tok = loaded.tokenizer
    stop_ids = r.stop_token_ids
    markers = list(r.eot_markers) + [s for s in stop if s]
    ids = torch.tensor([r.prompt_ids(messages)], device=loaded.device)
    stream = _TextStream(tok, markers, on_text, cancelled)
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id or stop_ids[0],
                              streamer=stream, stopping_criteria=StoppingCriteriaList([_StopCriterion(stream, ids.shape[1])]))
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    new = out[0, ids.shape[1]:].tolist()
    text = tok.decode(new, skip_special_tokens=False)
    cut = _cut(text, markers)
    ended = cut < len(text) or (bool(new) and new[-1] in stop_ids)
    final = text[:cut].strip()
    stream.finish(final)
    return Completion(final, "stop" if ended or stream.cancelled.is_set() else "length", ids.shape[1], len(new))


def generate(loaded: Loaded, conversations: Sequence[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             stop: Sequence[str] = (), on_text: Optional[Callable[[str], None]] = None) -> list[str]:
    """Complete each conversation's next assistant turn. Greedy when temperature == 0.

    ``on_text``: called with each new piece of a reply as it is generated (streaming); the
    pieces add up to the returned text (end-of-turn markers never reach it)."""
    return [generate_one(loaded, msgs, max_new_tokens, temperature, top_p, stop, on_text).text for msgs in conversations]


def generate_batched(loaded: Loaded, conversations: Sequence[list[dict]], max_new_tokens: int = 128, batch_size: int = 16,
                     on_batch: Optional[Callable[[int], None]] = None) -> list[str]:
    """Greedy completions of many conversations, batched with left padding and the KV cache
    (:func:`tunelab.models.generation.greedy_batched`). The same string as :func:`generate` one
    prompt at a time (up to float rounding; exact in fp32 in the tests); its stop check on
    markers that are no single token costs more than it saves here, so rows stop at their
    end-of-turn token and the text is cut at the first marker. Returns the completions in the
    order given, end-of-turn markers stripped."""
    return greedy_batched(loaded.model, loaded.tokenizer, loaded.renderer, loaded.device, conversations, max_new_tokens,
                          batch_size, on_batch)
