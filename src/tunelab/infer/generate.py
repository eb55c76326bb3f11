"""Load a run (or a model) for inference, and generate with the training template.

Prompts are rendered by the same :class:`Renderer` used in training, so the format at
inference is the training format (docs/practices.md#data-format-match). Decoding is greedy by default and stops at
the end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..config import Config, load_config
from ..data.render import Renderer
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


@torch.no_grad()
def generate(loaded: Loaded, conversations: Sequence[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             on_text: Optional[Callable[[str], None]] = None) -> list[str]:
    """Complete each conversation's next assistant turn. Greedy when temperature == 0.

    ``on_text``: called with each new piece of the reply as it is generated (streaming); the
    pieces add up to the returned text (end-of-turn markers never reach it)."""
    r = loaded.renderer
    tok = loaded.tokenizer
    outs = []
    stop_ids = r.stop_token_ids
    multi_token_markers = [m for m in r.eot_markers if m not in tok.get_vocab()][:4]
    for msgs in conversations:
        ids = torch.tensor([r.prompt_ids(msgs)], device=loaded.device)
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id or stop_ids[0])
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if multi_token_markers:
            kw.update(stop_strings=multi_token_markers, tokenizer=tok)
        streamer = _Streamer(tok, r.eot_markers, on_text) if on_text is not None else None
        if streamer is not None:
            kw["streamer"] = streamer
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
        outs.append(_strip_eot(text, r.eot_markers))
        if streamer is not None:
            streamer.finish(outs[-1])
    return outs


class _Streamer:
    """A transformers streamer (``put``/``end``) that hands the reply's new text to ``emit``,
    holding back what could be the start of an end-of-turn marker and stopping at one."""

    def __init__(self, tokenizer: Any, markers: Sequence[str], emit: Callable[[str], None]):
        self.tok, self.markers, self.emit = tokenizer, [m for m in markers if m], emit
        self.ids: list[int] = []
        self.prompt_seen = False
        self.sent = 0  # characters of the stripped reply already emitted
        self.hold = max((len(m) for m in self.markers), default=0)

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        cut = min([text.find(m) for m in self.markers if m in text] or [len(text)])
        safe = cut if cut < len(text) else max(0, len(text) - self.hold)
        if text[:safe].endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self._send(text[:safe].lstrip())

    def _send(self, reply_so_far: str) -> None:
        if len(reply_so_far) > self.sent:
            self.emit(reply_so_far[self.sent:])
            self.sent = len(reply_so_far)

    def end(self) -> None:
        pass

    def finish(self, reply: str) -> None:
        """Emit whatever of the final (stripped) reply has not been emitted yet."""
        self._send(reply)


def _strip_eot(text: str, markers: Sequence[str]) -> str:
    cut = len(text)
    for m in markers:
        k = text.find(m)
        if k >= 0:
            cut = min(cut, k)
    return text[:cut].strip()
