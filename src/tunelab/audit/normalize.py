"""Normalized views of each record, computed once and shared by the checks.

Normalization (for exact duplicates and shingles): Unicode NFKC, lower case, punctuation
removed, whitespace collapsed, i.e. the words ``\\w+`` of the lower-cased text joined by one
space. "Hello,  World!" and "hello world" are the same text after it.

Each record yields:
* ``full_key``: a 128-bit hash of the normalized conversation (role + text of every turn);
* ``prompt_key``: the same for everything before the last assistant turn (the prompt);
* ``completion_key``: the same for the last assistant turn (the completion);
* its words as ids into one vocabulary (the raw material of the near-duplicate shingles),
  stored flat (one int32 array + offsets) because 100k records x 150 words as Python
  strings would take gigabytes.
"""

from __future__ import annotations

import hashlib
from array import array
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..data.formats import Conversation
from .reader import AuditRecord

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    return " ".join(words(text))


def _key(parts: Sequence[str]) -> bytes:
    return hashlib.blake2b("\x1e".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def split_prompt(conv: Conversation) -> tuple[list[dict], Optional[dict]]:
    """(messages before the last assistant turn, the last assistant turn)."""
    if conv.is_text:
        return [], {"role": "assistant", "content": conv.text}
    for k in range(len(conv.messages) - 1, -1, -1):
        if conv.messages[k]["role"] == "assistant":
            return conv.messages[:k], conv.messages[k]
    return list(conv.messages), None


@dataclass
class TextViews:
    n: int
    full_key: list = field(default_factory=list)  # bytes | None per record
    prompt_key: list = field(default_factory=list)  # bytes | None (None: no prompt text)
    completion_key: list = field(default_factory=list)  # bytes | None
    prompt_words: Optional[np.ndarray] = None  # words outside assistant turns (masked part)
    completion_words: Optional[np.ndarray] = None  # words of the last completion
    trained_words: Optional[np.ndarray] = None  # words of all assistant turns (trained part)
    word_ids: Optional[np.ndarray] = None  # flat word ids, in order
    offsets: Optional[np.ndarray] = None  # record i's words: word_ids[offsets[i]:offsets[i+1]]
    vocab: list = field(default_factory=list)  # id -> word

    def ids(self, i: int) -> np.ndarray:
        return self.word_ids[self.offsets[i]:self.offsets[i + 1]]


def build_views(records: list[AuditRecord]) -> TextViews:
    n = len(records)
    v = TextViews(n)
    vocab: dict[str, int] = {}
    vocab_list: list[str] = v.vocab
    getitem = vocab.__getitem__
    flat = array("i")  # 4 bytes a word, not a Python list of pointers
    offsets = np.zeros(n + 1, dtype=np.int64)
    pw = np.zeros(n, dtype=np.int32)
    cw = np.zeros(n, dtype=np.int32)
    tw = np.zeros(n, dtype=np.int32)

    def to_ids(ws: list[str]) -> list[int]:
        try:  # fast path once the vocabulary has seen the words: map runs in C
            return list(map(getitem, ws))
        except KeyError:
            out = []
            for w in ws:
                i = vocab.get(w)
                if i is None:
                    i = vocab[w] = len(vocab_list)
                    vocab_list.append(w)
                out.append(i)
            return out

    for i, rec in enumerate(records):
        conv = rec.conv
        if conv is None:
            v.full_key.append(None)
            v.prompt_key.append(None)
            v.completion_key.append(None)
            offsets[i + 1] = len(flat)
            continue
        msgs = [{"role": "text", "content": conv.text}] if conv.is_text else conv.messages
        last = len(msgs) - 1 if conv.is_text else max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        parts = []
        for k, m in enumerate(msgs):
            ws = words(m["content"])
            parts.append(m["role"] + "\x1f" + " ".join(ws))
            flat.extend(to_ids(ws))
            if m["role"] in ("assistant", "text"):
                tw[i] += len(ws)
            else:
                pw[i] += len(ws)
            if k == last:
                cw[i] = len(ws)
        offsets[i + 1] = len(flat)
        v.full_key.append(_key(parts))
        prompt_parts = parts[:last] if last > 0 else []
        has_prompt = any(not p.endswith("\x1f") for p in prompt_parts)
        v.prompt_key.append(_key(prompt_parts) if has_prompt else None)
        v.completion_key.append(_key(parts[last:last + 1]) if last >= 0 else None)
    v.word_ids = np.frombuffer(flat, dtype=np.int32) if len(flat) else np.zeros(0, dtype=np.int32)
    v.offsets = offsets
    v.prompt_words, v.completion_words, v.trained_words = pw, cw, tw
    return v
