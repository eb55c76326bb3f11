"""Token counts of the rendered training text, fast enough for 100k records.

The counts are the ones ``Renderer.encode_many`` would produce (total tokens, trained
tokens), without its per-record cost:

* ``encode_many`` tokenizes each text in chunks cut at the generation cues and turn ends,
  and every trained character range starts and ends on such a cut. So the token count of
  a record is the sum of the token counts of its chunks, and a chunk is either wholly
  trained or wholly masked. Counting tokens per chunk (one batch call of the fast
  tokenizer, no offsets, no Python label loop) gives the exact totals.
* Rendering a conversation costs three Jinja renders per assistant turn (~0.2 ms). Records
  that share a role sequence share a *skeleton*: the template rendered once with sentinel
  contents; a record's text is the skeleton with its contents put back, and its cut points
  move by the lengths of the contents. A skeleton is used only if the template inserts
  contents verbatim (checked with a probe of whitespace and markup characters) and its
  renderings match ``render_with_offsets`` on sampled records; otherwise those records take
  the exact slow path (``encode_many``). A sample is also re-counted with ``encode_many``
  at the end, and any disagreement sends every record down the slow path.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..data.formats import Conversation
from ..data.render import IGNORE, Renderer
from .reader import AuditRecord

_S0, _S1 = "\ue000", "\ue001"  # private-use characters: sentinel brackets
_PROBE = " \n<&'\"{{x}}\t"  # characters a template might escape, trim or rewrite


def _sent(j: int) -> str:
    return f"{_S0}{j}{_S1}"


@dataclass
class Skeleton:
    pieces: list[str]  # template text around the n contents (n + 1 pieces)
    cuts: list[tuple[int, int]]  # (piece index, offset in piece), sorted
    trained: list[tuple[tuple[int, int], tuple[int, int]]]

    def place(self, contents: Sequence[str]) -> tuple[str, list[int], list[tuple[int, int]]]:
        base = [0]
        for p, c in zip(self.pieces, contents):
            base.append(base[-1] + len(p) + len(c))
        text = "".join(p + c for p, c in zip(self.pieces, list(contents) + [""]))
        pos = lambda kp: base[kp[0]] + kp[1]  # noqa: E731
        return text, [pos(c) for c in self.cuts], [(pos(a), pos(b)) for a, b in self.trained]


def _locate(p: int, spans: list[tuple[int, int]], total: int) -> Optional[tuple[int, int]]:
    """Skeleton position -> (piece, offset); None inside a sentinel."""
    start = 0
    for k, (a, b) in enumerate(spans + [(total, total)]):
        if start <= p <= a:
            return (k, p - start)
        if a < p < b:
            return None
        start = b
    return None


def build_skeleton(renderer: Renderer, roles: tuple[str, ...], train_on: str) -> Optional[Skeleton]:
    msgs = [{"role": r, "content": _sent(j)} for j, r in enumerate(roles)]
    rt = renderer.render_with_offsets(Conversation(messages=msgs), train_on)
    text = rt.text
    spans = []
    for j in range(len(roles)):
        s = _sent(j)
        k = text.find(s)
        if k < 0 or text.find(s, k + 1) >= 0:
            return None  # the template drops or repeats a content
        spans.append((k, k + len(s)))
    if spans != sorted(spans):
        return None
    pieces, start = [], 0
    for a, b in spans:
        pieces.append(text[start:a])
        start = b
    pieces.append(text[start:])
    cuts = [_locate(c, spans, len(text)) for c in rt.cuts]
    trained = [(_locate(a, spans, len(text)), _locate(b, spans, len(text))) for a, b in rt.trained]
    if any(c is None for c in cuts) or any(a is None or b is None for a, b in trained):
        return None
    if train_on != "all":
        # The trained range must end on the template's end-of-turn marker; a template without
        # one ends it at the stripped content, which depends on the content.
        for _, b in trained:
            pre = text[: spans[b[0] - 1][1] + b[1]] if b[0] > 0 else text[: b[1]]
            if not any(pre.endswith(m) for m in renderer.eot_markers if m):
                return None
    sk = Skeleton(pieces, cuts, trained)
    # The probe: contents with whitespace and markup must come out verbatim.
    probe = [_PROBE + _sent(j) + _PROBE for j in range(len(roles))]
    if not _agrees(renderer, sk, roles, probe, train_on):
        return None
    return sk


def _agrees(renderer: Renderer, sk: Skeleton, roles: Sequence[str], contents: Sequence[str], train_on: str) -> bool:
    rt = renderer.render_with_offsets(Conversation(messages=[{"role": r, "content": c} for r, c in zip(roles, contents)]), train_on)
    text, cuts, trained = sk.place(contents)
    return text == rt.text and cuts == list(rt.cuts) and trained == [tuple(t) for t in rt.trained]


def _chunks(text: str, cuts: list[int], trained: list[tuple[int, int]]) -> Optional[list[tuple[str, bool]]]:
    """The pieces encode_many tokenizes, each flagged trained or not (None if a piece straddles)."""
    bounds = [0] + [c for c in cuts if 0 < c < len(text)] + [len(text)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        if b <= a:
            continue
        inside = any(s <= a and b <= e for s, e in trained)
        if not inside and any(a < e and s < b for s, e in trained):
            return None
        out.append((text[a:b], inside))
    return out


def token_counter(tokenizer: Any) -> Callable[[list[str]], list[int]]:
    """Token counts of texts, without special tokens added: what encode_many's chunks get."""
    bt = getattr(tokenizer, "backend_tokenizer", None)
    if bt is not None and hasattr(bt, "encode_batch_fast"):
        return lambda texts: [len(e) for e in bt.encode_batch_fast(texts, add_special_tokens=False)] if texts else []
    return lambda texts: [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


@dataclass
class TokenCounts:
    unit: str  # "tokens" or "words"
    total: np.ndarray  # per record idx, -1 where not counted
    trained: np.ndarray
    kept_trained: np.ndarray  # trained tokens at positions < max_seq_len (right truncation)
    max_seq_len: Optional[int]
    errors: list[tuple[int, str]] = field(default_factory=list)  # (idx, template error)
    fast: int = 0
    slow: int = 0
    note: str = ""
    seconds: float = 0.0


def _kept(chunk_lens: list[int], flags: list[bool], limit: Optional[int]) -> int:
    if limit is None:
        return sum(n for n, f in zip(chunk_lens, flags) if f)
    pos = kept = 0
    for n, f in zip(chunk_lens, flags):
        if f and pos < limit:
            kept += min(pos + n, limit) - pos
        pos += n
    return kept


def count_tokens(records: list[AuditRecord], renderer: Renderer, train_on: str = "assistant", max_seq_len: Optional[int] = None,
                 batch: int = 4096, seed: int = 0, self_check: int = 24) -> TokenCounts:
    t0 = time.perf_counter()
    n = len(records)
    out = TokenCounts("tokens", np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64), max_seq_len)
    count = token_counter(renderer.tokenizer)
    todo = [r for r in records if r.conv is not None]
    skeletons: dict[tuple, Optional[Skeleton]] = {}
    rng = random.Random(seed)
    by_roles: dict[tuple, list[AuditRecord]] = {}
    for r in todo:
        if not r.conv.is_text:
            by_roles.setdefault(tuple(m["role"] for m in r.conv.messages), []).append(r)
    for roles, rs in by_roles.items():
        try:
            sk = build_skeleton(renderer, roles, train_on)
        except Exception:  # the template rejects this role sequence: the slow path reports it per record
            sk = None
        if sk is not None:
            sample = rs[:4] + rng.sample(rs, min(4, len(rs)))
            try:
                if not all(_agrees(renderer, sk, roles, [m["content"] for m in r.conv.messages], train_on)
                           for r in sample if not _has_sentinel(r.conv)):
                    sk = None
            except Exception:
                sk = None
        skeletons[roles] = sk

    slow: list[AuditRecord] = []
    pending: list[tuple[int, list[tuple[str, bool]]]] = []

    def flush() -> None:
        if not pending:
            return
        lens = count([c for _, chunks in pending for c, _ in chunks])
        k = 0
        for idx, chunks in pending:
            cl = lens[k:k + len(chunks)]
            fl = [f for _, f in chunks]
            k += len(chunks)
            out.total[idx] = sum(cl)
            out.trained[idx] = sum(x for x, f in zip(cl, fl) if f)
            out.kept_trained[idx] = _kept(cl, fl, max_seq_len)
        pending.clear()

    eos = renderer.tokenizer.eos_token or ""
    for r in todo:
        conv = r.conv
        if conv.is_text:
            text = conv.text + eos
            chunks = [(text, True)]
        else:
            sk = skeletons.get(tuple(m["role"] for m in conv.messages))
            if sk is None or _has_sentinel(conv):
                slow.append(r)
                continue
            text, cuts, trained = sk.place([m["content"] for m in conv.messages])
            chunks = _chunks(text, cuts, trained)
            if chunks is None:
                slow.append(r)
                continue
        pending.append((r.idx, chunks))
        if len(pending) >= batch:
            flush()
    flush()
    out.fast = len(todo) - len(slow)

    # Self-check: a sample recounted by encode_many itself must agree exactly.
    fast_done = [r for r in todo if out.total[r.idx] >= 0]
    sample = rng.sample(fast_done, min(self_check, len(fast_done)))
    if sample and not _matches(renderer, sample, out, train_on, max_seq_len):
        out.note = "the fast token count disagreed with encode_many on a sample; every record was counted the slow way"
        slow = list(todo)
        out.fast = 0
    _slow_path(slow, renderer, train_on, max_seq_len, out)
    out.slow = len(slow)
    out.seconds = round(time.perf_counter() - t0, 3)
    return out


def _has_sentinel(conv: Conversation) -> bool:
    return any(_S0 in m["content"] or _S1 in m["content"] for m in conv.messages)


def _from_labels(labels: list[int], limit: Optional[int]) -> tuple[int, int, int]:
    trained = sum(1 for x in labels if x != IGNORE)
    kept = trained if limit is None else sum(1 for x in labels[:limit] if x != IGNORE)
    return len(labels), trained, kept


def _matches(renderer: Renderer, sample: list[AuditRecord], out: TokenCounts, train_on: str, limit: Optional[int]) -> bool:
    try:
        exs, _ = renderer.encode_many([r.conv for r in sample], train_on, None, "drop", check_parity=False)
    except Exception:
        return False
    by_src = {e.source: e for e in exs}
    for r in sample:
        e = by_src.get(r.conv.source)
        if e is None:  # encode_many drops records without trained tokens
            if out.trained[r.idx] != 0:
                return False
            continue
        if _from_labels(e.labels, limit) != (out.total[r.idx], out.trained[r.idx], out.kept_trained[r.idx]):
            return False
    return True


def _slow_path(slow: list[AuditRecord], renderer: Renderer, train_on: str, limit: Optional[int], out: TokenCounts, batch: int = 256) -> None:
    for s in range(0, len(slow), batch):
        part = slow[s:s + batch]
        try:
            exs, _ = renderer.encode_many([r.conv for r in part], train_on, None, "drop", check_parity=False)
            _store(part, exs, out, limit)
        except Exception:
            for r in part:  # find the records the template rejects, one by one
                try:
                    exs, _ = renderer.encode_many([r.conv], train_on, None, "drop", check_parity=False)
                    _store([r], exs, out, limit)
                except Exception as e:
                    out.errors.append((r.idx, f"{type(e).__name__}: {e}"))


def _store(part: list[AuditRecord], exs: list, out: TokenCounts, limit: Optional[int]) -> None:
    by_src = {e.source: e for e in exs}
    for r in part:
        e = by_src.get(r.conv.source)
        if e is None:
            out.total[r.idx], out.trained[r.idx], out.kept_trained[r.idx] = 0, 0, 0
            continue
        out.total[r.idx], out.trained[r.idx], out.kept_trained[r.idx] = _from_labels(e.labels, limit)
