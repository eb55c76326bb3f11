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
            model = load_model(str(trained), dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation)
            tok = load_tokenizer(str(trained), cfg.model.trust_remote_code)
        else:
            base = resolve_model_path(cfg.model.name)
            model = load_model(base, dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation, _qconfig(cfg, dtype))
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
def generate(loaded: Loaded, conversations: Sequence[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Complete each conversation's next assistant turn. Greedy when temperature == 0."""
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
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
        outs.append(_strip_eot(text, r.eot_markers))
    return outs


@torch.no_grad()
def generate_batched(loaded: Loaded, conversations: Sequence[list[dict]], max_new_tokens: int = 128, batch_size: int = 16,
                     on_batch: Optional[Callable[[int], None]] = None) -> list[str]:
    """Greedy completions of many conversations, ``batch_size`` at a time: prompts sorted by
    length (little padding), left-padded with an attention mask (transformers derives the
    positions from it), decoded with the KV cache, each row stopping at its end-of-turn token.
    The same tokens as :func:`generate` one prompt at a time (up to float rounding; exact in
    fp32 in the tests). End-of-turn markers that are no single token (other templates' markers
    written as text) do not stop a row early as :func:`generate`'s ``stop_strings`` do (that
    check costs more than it saves here), but the text is cut at the first one all the same, so
    the result is the same string. ``on_batch(n)`` is called with the number of prompts done,
    for a progress bar. Returns the completions in the order given, end-of-turn markers stripped."""
    r, tok = loaded.renderer, loaded.tokenizer
    stop_ids = r.stop_token_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    prompts = [r.prompt_ids(m) for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    outs: list[str] = [""] * len(prompts)
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad, do_sample=False,
                              temperature=None, top_p=None, top_k=None, use_cache=True)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        out = loaded.model.generate(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), **kw)
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
            outs[i] = _strip_eot(tok.decode(new[:end + 1], skip_special_tokens=False), r.eot_markers)
        if on_batch is not None:
            on_batch(len(idx))
    return outs


def _strip_eot(text: str, markers: Sequence[str]) -> str:
    cut = len(text)
    for m in markers:
        k = text.find(m)
        if k >= 0:
            cut = min(cut, k)
    return text[:cut].strip()
