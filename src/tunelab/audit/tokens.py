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
* Tokenizing is still ~0.6 ms of CPU per 150-word record (measured with SmolLM2's
  tokenizer). Above ``sample_size`` records, only a seeded sample (which the percentiles
  describe) and the records that may not fit ``max_seq_len`` are tokenized; a record whose
  UTF-8 byte count bounds its token count below the limit provably fits (see TokenJob).
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..data.formats import Conversation
from ..data.render import IGNORE, Renderer, chunk_spans
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

    @functools.cached_property
    def fixed_bytes(self) -> int:
        """Template bytes plus one token of slack per possible chunk: with the contents' bytes,
        the byte bound of the token count (see _bound)."""
        return sum(len(_utf8(p)) for p in self.pieces) + len(self.cuts) + 1

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


def build_skeleton(renderer: Renderer, roles: tuple[str, ...]) -> Optional[Skeleton]:
    msgs = [{"role": r, "content": _sent(j)} for j, r in enumerate(roles)]
    rt = renderer.render_with_offsets(Conversation(messages=msgs))
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
    if renderer.train_on != "all":
        # The trained range must end on the template's end-of-turn marker; a template without
        # one ends it at the stripped content, which depends on the content.
        for _, b in trained:
            pre = text[: spans[b[0] - 1][1] + b[1]] if b[0] > 0 else text[: b[1]]
            if not any(pre.endswith(m) for m in renderer.eot_markers if m):
                return None
    sk = Skeleton(pieces, cuts, trained)
    # The probe: contents with whitespace and markup must come out verbatim.
    probe = [_PROBE + _sent(j) + _PROBE for j in range(len(roles))]
    if not _agrees(renderer, sk, roles, probe):
        return None
    return sk


def _agrees(renderer: Renderer, sk: Skeleton, roles: Sequence[str], contents: Sequence[str]) -> bool:
    rt = renderer.render_with_offsets(Conversation(messages=[{"role": r, "content": c} for r, c in zip(roles, contents)]))
    text, cuts, trained = sk.place(contents)
    return text == rt.text and cuts == list(rt.cuts) and trained == [tuple(t) for t in rt.trained]


def _chunks(text: str, cuts: list[int], trained: list[tuple[int, int]]) -> Optional[list[tuple[str, bool]]]:
    """The pieces encode_many tokenizes (render.chunk_spans, the very same cutting), each flagged
    trained or not (None if a piece straddles a trained range's edge)."""
    out = []
    for a, b in chunk_spans(text, cuts):
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
    sample: Optional[np.ndarray] = None  # idx of the records the percentiles describe (None: every counted record)
    within_bound: int = 0  # records not tokenized because they provably fit max_seq_len
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


def _utf8(s: str) -> bytes | str:
    """Something whose len() is the UTF-8 byte count (an ASCII str is its own; isascii is O(1))."""
    return s if s.isascii() else s.encode("utf-8", "surrogatepass")


def _bound(chunks: list[tuple[str, bool]]) -> int:
    """An upper bound of the token count: every token covers at least one byte of its chunk,
    give or take one token a chunk for a prefix some tokenizers add (checked on the sample)."""
    return sum(len(_utf8(c)) + 1 for c, _ in chunks)


def count_tokens(records: list[AuditRecord], renderer: Renderer, max_seq_len: Optional[int] = None,
                 batch: int = 4096, seed: int = 0, self_check: int = 24, sample_size: Optional[int] = 10000) -> TokenCounts:
    """Token counts of the rendered records (see :class:`TokenJob`)."""
    return TokenJob(records, renderer, max_seq_len, batch, seed, self_check, sample_size).result()


class TokenJob:
    """Token counting, started now and collected by :meth:`result`.

    The constructor does the Python part (skeletons, rendering, chunking, the byte bound) and
    hands each batch of chunks to one background thread that only calls the tokenizer: its
    Rust code releases the GIL, so the caller's own Python work (the other checks) runs
    meanwhile. (With the Python part in the thread too, both threads queued for the GIL: the
    100k-record benchmark took 72 s instead of 51 s on the same busy 2-core machine.)

    With ``sample_size`` (default 10000) and more records than that, tokenization (the
    dominant cost: ~0.6 ms of CPU a record) is spent where it decides something: on a seeded
    random sample, which the percentiles describe, and on every record whose byte-length bound
    exceeds ``max_seq_len``. The others provably fit and lose nothing, so the counts of records
    over the limit and of cut completions stay exact. The bound is checked on every tokenized
    record; if it ever fails, everything is tokenized.
    """

    def __init__(self, records: list[AuditRecord], renderer: Renderer, max_seq_len: Optional[int] = None,
                 batch: int = 4096, seed: int = 0, self_check: int = 24, sample_size: Optional[int] = 10000):
        from concurrent.futures import ThreadPoolExecutor

        self.t0 = time.perf_counter()
        self.renderer, self.max_seq_len, self.batch, self.self_check = renderer, max_seq_len, batch, self_check
        n = len(records)
        self.out = TokenCounts("tokens", np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64), max_seq_len)
        self.count = token_counter(renderer.tokenizer)
        self.todo = todo = [r for r in records if r.conv is not None]
        self.rng = rng = random.Random(seed)
        self.skeletons = skeletons = self._skeletons(todo)
        self.sampling = sample_size is not None and len(todo) > sample_size
        self.in_sample = set(r.idx for r in rng.sample(todo, sample_size)) if self.sampling else None
        self.slow: list[AuditRecord] = []
        self.skipped: list[AuditRecord] = []
        self.jobs: list = []  # (batch of (idx, chunks), future of its token counts)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-tokenizer")
        self.eos = eos = renderer.tokenizer.eos_token or ""
        pending: list[tuple[int, list[tuple[str, bool]]]] = []
        eos_bytes = len(eos.encode("utf-8")) + 1
        for r in todo:
            conv = r.conv
            if conv.is_text:
                if self._fits(r, len(_utf8(conv.text)) + eos_bytes):
                    continue
                chunks = [(conv.text + eos, True)]
            else:
                sk = skeletons.get(tuple(m["role"] for m in conv.messages))
                if sk is None or _has_sentinel(conv):
                    self.slow.append(r)
                    continue
                contents = [m["content"] for m in conv.messages]
                # the same bound as _bound(chunks), from the lengths alone (no rendering needed)
                if self._fits(r, sk.fixed_bytes + sum(len(_utf8(c)) for c in contents)):
                    continue
                chunks = _chunks(*sk.place(contents))
                if chunks is None:
                    self.slow.append(r)
                    continue
            pending.append((r.idx, chunks))
            if len(pending) >= batch:
                self._submit(pending)
                pending = []
        self._submit(pending)
        self.pool.shutdown(wait=False)
        self.prep_seconds = time.perf_counter() - self.t0

    def _fits(self, r: AuditRecord, bound: int) -> bool:
        """Outside the sample and provably within max_seq_len: not tokenized (counted as skipped)."""
        if self.sampling and r.idx not in self.in_sample and (self.max_seq_len is None or bound <= self.max_seq_len):
            self.skipped.append(r)
            return True
        return False

    def _skeletons(self, todo: list[AuditRecord]) -> dict[tuple, Optional[Skeleton]]:
        by_roles: dict[tuple, list[AuditRecord]] = {}
        for r in todo:
            if not r.conv.is_text:
                by_roles.setdefault(tuple(m["role"] for m in r.conv.messages), []).append(r)
        skeletons: dict[tuple, Optional[Skeleton]] = {}
        for roles, rs in by_roles.items():
            try:
                sk = build_skeleton(self.renderer, roles)
            except Exception:  # the template rejects this role sequence: the slow path reports it per record
                sk = None
            if sk is not None:
                probe = rs[:4] + self.rng.sample(rs, min(4, len(rs)))
                try:
                    if not all(_agrees(self.renderer, sk, roles, [m["content"] for m in r.conv.messages])
                               for r in probe if not _has_sentinel(r.conv)):
                        sk = None
                except Exception:
                    sk = None
            skeletons[roles] = sk
        return skeletons

    def _submit(self, pending: list) -> None:
        if pending:
            texts = [c for _, chunks in pending for c, _ in chunks]
            self.jobs.append((pending, self.pool.submit(self.count, texts)))

    def _store(self, pending: list, lens: list[int]) -> None:
        out, k = self.out, 0
        for idx, chunks in pending:
            cl = lens[k:k + len(chunks)]
            fl = [f for _, f in chunks]
            k += len(chunks)
            out.total[idx] = sum(cl)
            out.trained[idx] = sum(x for x, f in zip(cl, fl) if f)
            out.kept_trained[idx] = _kept(cl, fl, self.max_seq_len)

    def result(self) -> TokenCounts:
        out = self.out
        for pending, fut in self.jobs:
            self._store(pending, fut.result())
        self.jobs = []
        todo, slow, skipped = self.todo, self.slow, self.skipped
        out.fast = len(todo) - len(slow)
        # Self-checks: a sample recounted by encode_many must agree exactly; the byte bound
        # must hold on every record tokenized.
        fast_done = [r for r in todo if out.total[r.idx] >= 0]
        check = self.rng.sample(fast_done, min(self.self_check, len(fast_done)))
        if check and not _matches(self.renderer, check, out, self.max_seq_len):
            out.note = "the fast token count disagreed with encode_many on a sample; every record was counted the slow way"
            slow, skipped = list(todo), []
            out.fast = 0
        elif skipped and any(out.total[r.idx] > _bound_of(r, self.skeletons, self.eos) for r in fast_done[:2000]):
            out.note = "the byte bound of token counts failed on this tokenizer; every record was tokenized"
            for k in range(0, len(skipped), self.batch):
                pending = [(r.idx, _record_chunks(r, self.skeletons, self.eos)) for r in skipped[k:k + self.batch]]
                self._store(pending, self.count([c for _, chunks in pending for c, _ in chunks]))
            skipped = []
        _slow_path(slow, self.renderer, self.max_seq_len, out)
        out.slow = len(slow)
        out.within_bound = len(skipped)
        if self.sampling:
            out.sample = np.array(sorted(i for i in self.in_sample if out.total[i] >= 0), dtype=np.int64)
        out.seconds = round(time.perf_counter() - self.t0, 3)
        return out


def _record_chunks(r: AuditRecord, skeletons: dict, eos: str) -> list[tuple[str, bool]]:
    conv = r.conv
    if conv.is_text:
        return [(conv.text + eos, True)]
    sk = skeletons[tuple(m["role"] for m in conv.messages)]
    return _chunks(*sk.place([m["content"] for m in conv.messages]))


def _bound_of(r: AuditRecord, skeletons: dict, eos: str) -> int:
    return _bound(_record_chunks(r, skeletons, eos))


def _has_sentinel(conv: Conversation) -> bool:
    return any(_S0 in m["content"] or _S1 in m["content"] for m in conv.messages)


def _from_labels(labels: list[int], limit: Optional[int]) -> tuple[int, int, int]:
    trained = sum(1 for x in labels if x != IGNORE)
    kept = trained if limit is None else sum(1 for x in labels[:limit] if x != IGNORE)
    return len(labels), trained, kept


def _matches(renderer: Renderer, sample: list[AuditRecord], out: TokenCounts, limit: Optional[int]) -> bool:
    try:
        exs, _ = renderer.encode_many([r.conv for r in sample], None, "drop", check_parity=False)
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


def _slow_path(slow: list[AuditRecord], renderer: Renderer, limit: Optional[int], out: TokenCounts, batch: int = 256) -> None:
    for s in range(0, len(slow), batch):
        part = slow[s:s + batch]
        try:
            exs, _ = renderer.encode_many([r.conv for r in part], None, "drop", check_parity=False)
            _store(part, exs, out, limit)
        except Exception:
            for r in part:  # find the records the template rejects, one by one
                try:
                    exs, _ = renderer.encode_many([r.conv], None, "drop", check_parity=False)
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
