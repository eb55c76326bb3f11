"""Normalized views of each record, computed once and shared by the checks.

Normalization (for exact duplicates and shingles): Unicode NFKC, lower case, punctuation
removed, whitespace collapsed, i.e. the words ``\\w+`` of the lower-cased text. "Hello,
World!" and "hello world" are the same text after it.

Each record yields:

* ``full_key``: a hash of its normalized conversation (role + words of every turn);
* ``prompt_key``: the same for everything before the last assistant turn (the prompt);
* ``completion_key``: the same for the last assistant turn (the completion);
* its words as ids into one vocabulary (the raw material of the near-duplicate shingles),
  stored flat (one int32 array + offsets);
* word counts (prompt, completion, trained) and whether the completion echoes the prompt.

Keys are Python hashes of the normalized texts, used only to group records within one run
(64-bit: a chance collision among 100k records has a probability of about 1e-9).

Speed: this is the audit's hottest Python loop (~7 s of CPU for 100k records of 150 words,
measured; a numpy byte-buffer split was tried and was no faster). Word ids are handed out in
C (see :func:`build_views`) and records are reduced to int32 word ids at once, so no Python
string per word outlives its message.
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..data.formats import Conversation
from .reader import AuditRecord

_WORD = re.compile(r"\w+")

# ASCII fast path of the same split: every ASCII character that is not a word character
# (letter, digit, underscore) becomes a space, then str.split.
_NON_WORD = str.maketrans({chr(c): " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")})

def words(text: str) -> list[str]:
    """The words (``\\w+`` runs) of the lower-cased, NFKC-normalized text."""
    if text.isascii():
        return text.lower().translate(_NON_WORD).split()
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def normalize(text: str) -> str:
    return " ".join(words(text))


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
    full_key: list = field(default_factory=list)  # int | None per record
    prompt_key: list = field(default_factory=list)  # int | None (None: no prompt text)
    completion_key: list = field(default_factory=list)  # int | None
    prompt_words: Optional[np.ndarray] = None  # words outside assistant turns (masked part)
    completion_words: Optional[np.ndarray] = None  # words of the last completion
    trained_words: Optional[np.ndarray] = None  # words of all assistant turns (trained part)
    echo: Optional[np.ndarray] = None  # the completion starts with the last user message (>= 5 words) or equals it
    word_ids: Optional[np.ndarray] = None  # flat word ids, in order
    offsets: Optional[np.ndarray] = None  # record i's words: word_ids[offsets[i]:offsets[i+1]]
    vocab: list = field(default_factory=list)  # id -> word

    def ids(self, i: int) -> np.ndarray:
        return self.word_ids[self.offsets[i]:self.offsets[i + 1]]

    def word(self, i: int) -> str:
        return self.vocab[i]


def build_views(records: list[AuditRecord]) -> TextViews:
    """One pass over every message of every record: keys, word ids, counts, echo flags."""
    n = len(records)
    v = TextViews(n)
    # word -> id with no Python code per word: a missing word gets id len(vocab) from the
    # factory, so ``map(vocab.__getitem__, words)`` assigns ids in C.
    vocab: defaultdict = defaultdict()
    vocab.default_factory = vocab.__len__
    getitem = vocab.__getitem__
    flat = array("i")  # 4 bytes a word, not a Python list of pointers
    offsets = np.zeros(n + 1, dtype=np.int64)
    pw = np.zeros(n, dtype=np.int32)
    cw = np.zeros(n, dtype=np.int32)
    tw = np.zeros(n, dtype=np.int32)
    echo = np.zeros(n, dtype=bool)
    fk, pk, ck = v.full_key, v.prompt_key, v.completion_key
    for i, rec in enumerate(records):
        conv = rec.conv
        if conv is None:
            fk.append(None)
            pk.append(None)
            ck.append(None)
            offsets[i + 1] = len(flat)
            continue
        msgs = [{"role": "text", "content": conv.text}] if conv.is_text else conv.messages
        last = len(msgs) - 1
        while last >= 0 and msgs[last]["role"] not in ("assistant", "text"):
            last -= 1
        parts = []
        user = None
        for k, m in enumerate(msgs):
            ws = words(m["content"])
            role = m["role"]
            norm = " ".join(ws)
            parts.append((role, norm))
            flat.extend(map(getitem, ws))
            if role == "assistant" or role == "text":
                tw[i] += len(ws)
                if k == last:
                    cw[i] = len(ws)
                    if user and norm and (norm == user or (user.count(" ") >= 4 and norm.startswith(user + " "))):
                        echo[i] = True
            else:
                pw[i] += len(ws)
                if role == "user":
                    user = norm
        offsets[i + 1] = len(flat)
        fk.append(hash(tuple(parts)))
        prompt_parts = parts[:last] if last > 0 else []
        pk.append(hash(tuple(prompt_parts)) if any(t for _, t in prompt_parts) else None)
        ck.append(hash(parts[last]) if last >= 0 else None)
    v.vocab = list(vocab)  # insertion order = id order
    v.word_ids = np.frombuffer(flat, dtype=np.int32) if len(flat) else np.zeros(0, dtype=np.int32)
    v.offsets = offsets
    v.prompt_words, v.completion_words, v.trained_words, v.echo = pw, cw, tw, echo
    return v
