"""The self-instruct filters of Wang et al. (2022), each rejection counted by its reason.

In order (the first that applies is the reason counted):

* ``too_short`` / ``too_long``: the reference keeps instructions of 4 to 150 words;
* ``blacklisted_keyword``: what a text model cannot do (image, graph, picture, file, map,
  draw, plot, go to, ...: the reference list, matched as whole words);
* ``program_request`` (starts with "Write a program"), ``starts_with_punctuation``,
  ``non_ascii_start``: the reference's remaining heuristics;
* ``exact_duplicate``: the same text after the audit's normalization (``audit.normalize``);
* ``near_duplicate``: Jaccard >= 0.8 of the word sets, found with the audit's MinHash
  (``audit.neardup.signatures``, its LSH band shape) and confirmed exactly;
* ``rouge_similar``: ROUGE-L >= 0.7 against any instruction kept so far (seed or generated),
  through :class:`RougeIndex`.

An instruction that passes is added to every index at once, so candidates of one batch are
also checked against each other.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from typing import Optional

import numpy as np

from ..audit.neardup import _fmix32, band_params
from ..audit.normalize import normalize, words
from .rouge import RougeIndex

MIN_WORDS, MAX_WORDS = 4, 150  # the reference keeps 3 < words <= 150
ROUGE_THRESHOLD = 0.7
NEAR_DUP_THRESHOLD = 0.8
# tasks a text model cannot do: Wang et al. (2022), bootstrap_instructions.py, with the words Stanford
# Alpaca's generate_instruction.py adds (video, audio, music, flowchart, diagram)
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot", "go to",
             "video", "audio", "music", "flowchart", "diagram")
_BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)
REASONS = ("too_short", "too_long", "blacklisted_keyword", "program_request", "starts_with_punctuation", "non_ascii_start",
           "exact_duplicate", "near_duplicate", "rouge_similar")


class NearDupIndex:
    """Incremental near-duplicate search over word sets: the audit's MinHash signatures and
    recall-first LSH bands, every candidate confirmed with the exact Jaccard."""

    def __init__(self, threshold: float = NEAR_DUP_THRESHOLD, num_perm: int = 128, seed: int = 1):
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        self.bands, self.rows = band_params(threshold, num_perm)
        self.buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(self.bands)]
        self.sets: list[frozenset] = []
        from datasketch import MinHash

        a, b = (np.asarray(x, dtype=np.uint32) for x in MinHash(num_perm=num_perm, seed=seed).permutations)
        self._a, self._b = a[:, None], b[:, None]

    def _signature(self, ws: frozenset) -> np.ndarray:
        """The audit's MinHash signature of one word set (``audit.neardup.signatures``, the
        permutations kept instead of rebuilt per call, all of them in one broadcast)."""
        from datasketch.hashfunc import sha1_hash32

        h = np.fromiter((sha1_hash32(w.encode("utf-8", "surrogatepass")) for w in ws), dtype=np.uint32, count=len(ws))
        with np.errstate(over="ignore"):
            return (self._a * _fmix32(h)[None, :] + self._b).min(axis=1)

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[b * self.rows:(b + 1) * self.rows].tobytes() for b in range(self.bands)]

    def find(self, text: str) -> tuple[float, Optional[int]]:
        ws = frozenset(words(text))
        if not ws or not self.sets:
            return 0.0, None
        seen: set[int] = set()
        for b, key in enumerate(self._keys(self._signature(ws))):
            for k in self.buckets[b].get(key, ()):
                if k in seen:
                    continue
                seen.add(k)
                other = self.sets[k]
                j = len(ws & other) / len(ws | other)
                if j >= self.threshold:
                    return j, k
        return 0.0, None

    def add(self, text: str) -> None:
        ws = frozenset(words(text))
        k = len(self.sets)
        self.sets.append(ws)
        if ws:
            for b, key in enumerate(self._keys(self._signature(ws))):
                self.buckets[b][key].append(k)


def heuristic_reason(instruction: str) -> Optional[str]:
    """The first cheap filter an instruction fails, or None."""
    n = len(instruction.split())
    if n < MIN_WORDS:
        return "too_short"
    if n > MAX_WORDS:
        return "too_long"
    if _BLACKLIST_RE.search(instruction):
        return "blacklisted_keyword"
    if instruction.lower().startswith("write a program"):
        return "program_request"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "non_ascii_start"
    return None


class InstructionFilter:
    """The pool of kept instructions and the counts of every rejection."""

    def __init__(self, rouge_threshold: float = ROUGE_THRESHOLD, near_threshold: float = NEAR_DUP_THRESHOLD):
        self.rouge_threshold = rouge_threshold
        self.rouge = RougeIndex()
        self.near = NearDupIndex(near_threshold)
        self.exact: set[str] = set()
        self.rejected: Counter = Counter()
        self.kept = 0

    def add(self, instruction: str) -> None:
        """Put an instruction in the pool without checking it (seeds, a resumed run's records)."""
        self.exact.add(normalize(instruction))
        self.near.add(instruction)
        self.rouge.add(instruction)

    def reason(self, instruction: str) -> Optional[str]:
        """Why ``instruction`` is rejected, or None when it would be kept (nothing is counted)."""
        r = heuristic_reason(instruction)
        if r:
            return r
        if normalize(instruction) in self.exact:
            return "exact_duplicate"
        if self.near.find(instruction)[1] is not None:
            return "near_duplicate"
        if self.rouge.best(instruction, self.rouge_threshold)[0] >= self.rouge_threshold:
            return "rouge_similar"
        return None

    def offer(self, instruction: str) -> bool:
        """Check ``instruction``; keep it (True) or count why not (False)."""
        instruction = " ".join(instruction.split())
        r = self.reason(instruction) if instruction else "too_short"
        if r:
            self.rejected[r] += 1
            return False
        self.add(instruction)
        self.kept += 1
        return True

    def stats(self) -> dict:
        return {"kept": self.kept, "rejected": {r: self.rejected[r] for r in REASONS if self.rejected[r]}}
