"""Greedy batched generation with the training template: the one loop behind ``tunelab eval``
and the recipe's ``eval.generate_every`` exact-match probe.

It lives here, below ``train/``, so that the recipe can probe generations during training
without importing ``infer/`` (an upward import). ``infer.generate.generate_batched`` is the
thin wrapper that the commands call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..data.render import Renderer


def cut_at_markers(text: str, markers: Sequence[str]) -> int:
    """Index of the first end-of-turn marker in ``text`` (len(text) when there is none)."""
    cut = len(text)
    for m in markers:
        k = text.find(m)
        if k >= 0:
            cut = min(cut, k)
    return cut


@torch.no_grad()
def greedy_batched(model: Any, tokenizer: Any, renderer: Renderer, device: torch.device, conversations: Sequence[list[dict]],
                   max_new_tokens: int = 128, batch_size: int = 16, on_batch: Optional[Callable[[int], None]] = None) -> list[str]:
    """Greedy completions of many conversations, ``batch_size`` at a time: prompts sorted by
    length (little padding), left-padded with an attention mask (transformers derives the
    positions from it), decoded with the KV cache, each row stopping at its end-of-turn token.
    The same tokens as generating one prompt at a time (up to float rounding; exact in fp32 in
    the tests). End-of-turn markers that are no single token (other templates' markers written
    as text) do not stop a row early, but the text is cut at the first one all the same.
    ``on_batch(n)`` is called with the number of prompts done, for a progress bar. Returns the
    completions in the order given, end-of-turn markers stripped."""
    stop_ids = renderer.stop_token_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompts = [renderer.prompt_ids(m) for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    outs: list[str] = [""] * len(prompts)
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad, do_sample=False,
                              temperature=None, top_p=None, top_k=None, use_cache=True)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)  # [B, T], prompts right-aligned
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)  # [B, T + new]
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
            text = tokenizer.decode(new[:end + 1], skip_special_tokens=False)
            outs[i] = text[:cut_at_markers(text, renderer.eot_markers)].strip()
        if on_batch is not None:
            on_batch(len(idx))
    return outs
