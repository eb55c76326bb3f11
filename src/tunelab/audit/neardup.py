"""Near-duplicates: MinHash signatures over word shingles, an LSH index (datasketch) for
candidate pairs, exact Jaccard to confirm them, and clusters by union-find.

Design choices (each measured, see benchmarks/audit_speed.py and tests/audit):

* **Shingles are single words by default** (``shingle_size=1``). With 3-word shingles one
  edited word breaks three shingles, so a record with 10% of its words edited falls to a
  Jaccard of ~0.5 and would never reach the 0.8 threshold; with single words such an edit
  keeps the Jaccard at ~0.8-0.9 (10% substitutions are the hardest case: ~0.76-0.82).
  Word order is ignored, which is what a near-duplicate check wants anyway.
* **Signatures are computed vectorised with numpy**, bit-identical to
  ``datasketch.MinHash(num_perm, seed).update_batch(words)`` (sha1_hash32 of each word, the
  MurmurHash3 finalizer, affine permutations mod 2^32): one pass over the hashed shingles of
  a chunk of records instead of one Python call per record (~40x faster at 100k records).
* **LSH bands are chosen for recall at the threshold**, not datasketch's default
  FP/FN-balanced optimum (which at 0.8 finds only ~40% of pairs that sit exactly at 0.8):
  the most selective band shape whose hit probability at the threshold is >= 98%.
  Every candidate is then confirmed with the *exact* Jaccard of the shingle sets, so the
  index costs recall only at the margin and never precision.
* Exact duplicates are collapsed first (one representative per normalized text), so a
  near-duplicate cluster never double-counts them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .findings import WARNING, FindingList
from .normalize import TextViews
from .reader import AuditRecord

SECTION = "near_duplicates"
MAX_DETAIL = 20
_BIG_BUCKET = 64  # buckets larger than this are compared against cluster leaders only

_M32 = np.uint32


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 finalizer (datasketch applies it to every input hash before permuting)."""
    h = h ^ (h >> _M32(16))
    h = h * _M32(0x85EBCA6B)
    h = h ^ (h >> _M32(13))
    h = h * _M32(0xC2B2AE35)
    return h ^ (h >> _M32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def band_params(threshold: float, num_perm: int, min_recall: float = 0.98) -> tuple[int, int]:
    """(bands, rows): the largest row count r (fewest false candidates) such that a pair at
    exactly ``threshold`` shares a band with probability >= ``min_recall``."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if b < 2:
            break
        if 1 - (1 - threshold ** r) ** b >= min_recall:
            best = (b, r)
    return best


@dataclass
class NearDupResult:
    threshold: float
    shingle_size: int
    num_perm: int
    bands: int = 0
    rows: int = 0
    records_indexed: int = 0
    candidates: int = 0
    confirmed: int = 0
    clusters: list[list[int]] = field(default_factory=list)  # record idx, sorted; first is kept
    cluster_jaccard: list[float] = field(default_factory=list)  # lowest confirmed Jaccard in each cluster
    leaks: list[tuple[int, int, float]] = field(default_factory=list)  # (eval idx, train idx, Jaccard)
    seconds: dict = field(default_factory=dict)

    def drop(self) -> dict[int, int]:
        """idx -> idx of the kept record of its cluster, for every member after the first."""
        return {i: c[0] for c in self.clusters for i in c[1:]}


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def shingle_sets(reps: list[int], views: TextViews, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per representative: its sorted unique shingle values (exact, for Jaccard) and their
    32-bit hashes (MinHash input). Returns (values, hashes, offsets) flat."""
    from datasketch.hashfunc import sha1_hash32

    vocab_hash = np.fromiter((sha1_hash32(w.encode("utf-8", "surrogatepass")) for w in views.vocab), dtype=np.uint32, count=len(views.vocab))
    vals_parts, hash_parts = [], []
    offsets = np.zeros(len(reps) + 1, dtype=np.int64)
    for j, i in enumerate(reps):
        ids = views.ids(i)
        if k == 1 or len(ids) <= 1:
            u = np.unique(ids)
            vals = u.astype(np.uint64)
            h = vocab_hash[u] if k == 1 else (_fmix64(vals) >> np.uint64(32)).astype(np.uint32)
        else:
            # k-word shingles: combine the word ids of each window into one 64-bit value.
            seq = ids.astype(np.uint64)
            m = max(1, len(seq) - k + 1)
            acc = np.zeros(m, dtype=np.uint64)
            for t in range(min(k, len(seq))):
                acc = _fmix64(acc * np.uint64(0x100000001B3) ^ (seq[t:t + m] + np.uint64(1)))
            vals = np.unique(acc)
            h = (vals >> np.uint64(32)).astype(np.uint32)
        vals_parts.append(vals)
        hash_parts.append(h)
        offsets[j + 1] = offsets[j] + len(vals)
    values = np.concatenate(vals_parts) if vals_parts else np.zeros(0, np.uint64)
    hashes = np.concatenate(hash_parts) if hash_parts else np.zeros(0, np.uint32)
    return values, hashes, offsets


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int, chunk_values: int = 1 << 17) -> np.ndarray:
    """MinHash signatures (n x num_perm, uint32) of the sets hashes[offsets[i]:offsets[i+1]].

    Same values as datasketch's affine32 scheme: min over the set of (a * fmix32(h) + b) mod 2^32.
    Every set must be non-empty.
    """
    from datasketch import MinHash

    a, b = (np.asarray(x, dtype=np.uint32) for x in MinHash(num_perm=num_perm, seed=seed).permutations)
    n = len(offsets) - 1
    sig = np.empty((n, num_perm), dtype=np.uint32)
    mixed = _fmix32(hashes.astype(np.uint32))
    start = 0
    while start < n:
        # as many sets as fit in ~chunk_values hashed shingles (bounds memory: chunk x num_perm x 4 bytes)
        end = int(np.searchsorted(offsets, offsets[start] + chunk_values, side="right")) - 1
        end = min(max(end, start + 1), n)
        lo, hi = int(offsets[start]), int(offsets[end])
        with np.errstate(over="ignore"):
            phv = mixed[lo:hi, None] * a[None, :] + b[None, :]
        sig[start:end] = np.minimum.reduceat(phv, (offsets[start:end] - lo).astype(np.intp), axis=0)
        start = end
    return sig


def _jaccard(values: np.ndarray, offsets: np.ndarray, p: int, q: int) -> float:
    A = values[offsets[p]:offsets[p + 1]]
    B = values[offsets[q]:offsets[q + 1]]
    inter = np.intersect1d(A, B, assume_unique=True).size
    return inter / (len(A) + len(B) - inter)


def find_near_duplicates(records: list[AuditRecord], views: TextViews, threshold: float = 0.8, shingle_size: int = 1,
                         num_perm: int = 128, seed: int = 1) -> NearDupResult:
    from datasketch import LeanMinHash, MinHashLSH

    res = NearDupResult(threshold, shingle_size, num_perm)
    t0 = time.perf_counter()
    # One representative per normalized text: exact copies are the exact-duplicate check's.
    seen: set = set()
    reps: list[int] = []
    for r in records:
        k = views.full_key[r.idx]
        if k is None or k in seen or views.offsets[r.idx + 1] == views.offsets[r.idx]:
            continue
        seen.add(k)
        reps.append(r.idx)
    res.records_indexed = len(reps)
    if len(reps) < 2:
        return res
    values, hashes, offsets = shingle_sets(reps, views, shingle_size)
    t1 = time.perf_counter()
    sig = signatures(hashes, offsets, num_perm, seed)
    t2 = time.perf_counter()

    b, r = band_params(threshold, num_perm)
    res.bands, res.rows = b, r
    lsh = MinHashLSH(num_perm=num_perm, params=(b, r))
    for j in range(len(reps)):
        lsh.insert(j, LeanMinHash(seed=seed, hashvalues=sig[j], scheme="affine32"), check_duplication=False)
    t3 = time.perf_counter()

    # Candidate pairs: members of the same bucket in any band.
    sizes = np.diff(offsets)
    cand: set[int] = set()
    n = len(reps)
    confirmed: list[tuple[int, int, float]] = []

    def check(p: int, q: int) -> Optional[float]:
        if p > q:
            p, q = q, p
        key = p * n + q
        if key in cand:
            return None
        cand.add(key)
        lo, hi = sorted((int(sizes[p]), int(sizes[q])))
        if lo < threshold * hi:  # Jaccard <= |small| / |large|: cannot reach the threshold
            return None
        j = _jaccard(values, offsets, p, q)
        if j >= threshold:
            confirmed.append((p, q, j))
            return j
        return None

    for table in lsh.hashtables:
        for H in table.keys():
            members = table.get(H)
            if len(members) < 2:
                continue
            members = sorted(members)
            if len(members) <= _BIG_BUCKET:
                for x in range(len(members)):
                    for y in range(x + 1, len(members)):
                        check(members[x], members[y])
            else:
                # A huge bucket (a template shared by thousands of records): compare each
                # member with the leaders found so far instead of all pairs.
                leaders: list[int] = []
                for m in members:
                    if not any(check(l, m) is not None for l in leaders[:_BIG_BUCKET]):
                        leaders.append(m)
    res.candidates = len(cand)
    res.confirmed = len(confirmed)
    t4 = time.perf_counter()

    uf = _UnionFind(n)
    best_leak: dict[int, tuple[int, float]] = {}
    low: dict[int, float] = {}
    for p, q, j in confirmed:
        rp, rq = records[reps[p]], records[reps[q]]
        if rp.split == rq.split:
            uf.union(p, q)
        else:  # train/eval pair: leakage, not a cluster to clean
            e, t = (rp, rq) if rp.split == "eval" else (rq, rp)
            if e.idx not in best_leak or j > best_leak[e.idx][1]:
                best_leak[e.idx] = (t.idx, j)
    for p, q, j in confirmed:
        if records[reps[p]].split == records[reps[q]].split:
            root = uf.find(p)
            low[root] = min(low.get(root, 1.0), j)
    comps: dict[int, list[int]] = {}
    for j in range(n):
        comps.setdefault(uf.find(j), []).append(reps[j])
    clusters = [(sorted(c), low.get(root, 1.0)) for root, c in comps.items() if len(c) > 1]
    clusters.sort(key=lambda c: (-len(c[0]), c[0][0]))
    res.clusters = [c for c, _ in clusters]
    res.cluster_jaccard = [round(j, 4) for _, j in clusters]
    res.leaks = sorted((e, t, j) for e, (t, j) in best_leak.items())
    res.seconds = {"shingles": round(t1 - t0, 3), "signatures": round(t2 - t1, 3), "index": round(t3 - t2, 3),
                   "candidates": round(t4 - t3, 3), "clusters": round(time.perf_counter() - t4, 3)}
    return res


def findings(res: NearDupResult, records: list[AuditRecord]) -> FindingList:
    out = FindingList()
    redundant = sum(len(c) - 1 for c in res.clusters)
    if redundant:
        out.add("near_duplicate", WARNING,
                f"{redundant} records are near-duplicates of another record (Jaccard >= {res.threshold:g} over "
                f"{res.shingle_size}-word shingles) in {len(res.clusters)} clusters; the largest has {len(res.clusters[0])} records",
                redundant, [records[i].where for c in res.clusters for i in c[1:]],
                "Keep one record per cluster: tunelab audit --fix does (it keeps the first). "
                "Raise --near-dup-threshold if these are legitimate variations.",
                SECTION)
    return out


def details(res: NearDupResult, records: list[AuditRecord]) -> dict:
    from .dedup import preview

    return {
        "threshold": res.threshold,
        "shingle_size": res.shingle_size,
        "num_perm": res.num_perm,
        "lsh_bands": res.bands,
        "lsh_rows": res.rows,
        "records_indexed": res.records_indexed,
        "candidate_pairs": res.candidates,
        "confirmed_pairs": res.confirmed,
        "clusters_total": len(res.clusters),
        "redundant": sum(len(c) - 1 for c in res.clusters),
        "clusters": [
            {"size": len(c), "min_jaccard": j, "records": [records[i].where for i in c[:10]],
             "examples": [preview(records[i], 80) for i in c[:3]]}
            for c, j in zip(res.clusters[:MAX_DETAIL], res.cluster_jaccard)
        ],
        "seconds": res.seconds,
    }
