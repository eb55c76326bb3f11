"""Near-duplicates: MinHash signatures over word shingles, LSH banding for candidate pairs,
exact Jaccard to confirm them, and clusters by union-find.

Design choices (measured: tests/audit/test_audit_neardup.py, benchmarks/audit_speed.py):

* **Shingles are single words by default** (``shingle_size=1``). With 3-word shingles one
  edited word breaks three shingles, so a record with 10% of its words edited falls to a
  Jaccard of ~0.5 and would never reach the 0.8 threshold; with single words such an edit
  keeps it at ~0.8-0.9 (10% pure substitutions are the hardest case, ~0.76-0.82).
  Word order is ignored, which is what a near-duplicate check wants anyway.
* **Signatures are datasketch's MinHash, computed vectorised**: bit-identical to
  ``datasketch.MinHash(num_perm, seed).update_batch(words)`` (sha1_hash32 of each word, the
  MurmurHash3 finalizer, affine permutations mod 2^32), with one numpy pass per permutation
  over all records instead of one Python object per record (~18x less CPU on 5000 records).
* **LSH bands are chosen for recall at the threshold**, not datasketch's default
  FP/FN-balanced optimum (which at 0.8 and 128 permutations, b=9 r=13, finds only 40% of the
  pairs that sit exactly at 0.8): the most selective band shape whose hit probability at the
  threshold is >= 98% (b=18 r=7 at 0.8). The buckets are those of
  ``datasketch.MinHashLSH(params=(b, r))`` (a test checks they are identical) but built with
  one sort per band, since 100k Python inserts cost seconds; ``index="datasketch"`` uses
  MinHashLSH itself. Every candidate is then confirmed with the *exact* Jaccard of the
  shingle sets, so the index can cost recall only at the margin and never precision.
* **Template words are left out per file**: in a file of >= 50 records, words found in >= 90%
  of them (a prompt template) are not shingled, so records that share only a template are
  not near-duplicates of each other (see :func:`shingle_sets`).
* Exact duplicates are collapsed first (one representative per normalized text), so a
  near-duplicate cluster never double-counts them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

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


def sorted_unique(a: np.ndarray, counts: bool = False):
    """np.unique by sorting: numpy 2.x's hash-based np.unique is ~50x slower on millions of int64."""
    a = np.sort(a, kind="stable")
    if len(a) == 0:
        return (a, np.zeros(0, np.int64)) if counts else a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    u = a[keep]
    if not counts:
        return u
    starts = np.flatnonzero(keep)
    return u, np.diff(np.append(starts, len(a)))


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
    boilerplate: dict = field(default_factory=dict)  # file -> template words left out of its shingles
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


def _gather(views: TextViews, reps_a: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(record number, word id) of every word of representatives lo..hi-1, in order (int64)."""
    starts = views.offsets[reps_a[lo:hi]]
    lens = views.offsets[reps_a[lo:hi] + 1] - starts
    first = np.cumsum(lens) - lens
    pos = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(first, lens) + np.repeat(starts, lens)
    return np.repeat(np.arange(lo, hi, dtype=np.int64), lens), views.word_ids[pos].astype(np.int64)


def _record_word_pairs(views: TextViews, reps_a: np.ndarray, V: int, chunk: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """Each (record, word) once, sorted by record then word; in chunks of records to bound memory."""
    recs, wds = [], []
    for lo in range(0, len(reps_a), chunk):
        rec, words = _gather(views, reps_a, lo, min(lo + chunk, len(reps_a)))
        key = rec * V + words
        del rec, words
        key = sorted_unique(key)
        r = key // V
        recs.append(r.astype(np.int32))
        wds.append((key - r * V).astype(np.int32))
    if not recs:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(recs), np.concatenate(wds)


def shingle_sets(reps: list[int], records: list[AuditRecord], views: TextViews, k: int = 1,
                 boilerplate_df: Optional[float] = 0.9, min_records: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The shingle set of each representative, vectorised over all of them.

    Returns (values, hashes, offsets, boilerplate): set j is ``values[offsets[j]:offsets[j+1]]``
    (sorted, unique; exact, for the Jaccard), ``hashes`` the matching 32-bit MinHash inputs
    (sha1_hash32 of the word, as datasketch hashes b"word"), and per file the template words
    that were left out.

    Template words: in a file of >= ``min_records`` records, words found in >= ``boilerplate_df``
    of them. In templated data (FLAN/T0: "Humans can easily string together abstract concepts
    ... with the concepts {a}, {b}, {c}") the template is most of each record's words, and two
    records sharing only the template would look like near-duplicates. A record keeps all its
    words when fewer than max(3, 20%) would remain (a file of near-identical records is all
    "template", and must still be caught).
    """
    from datasketch.hashfunc import sha1_hash32

    reps_a = np.asarray(reps, dtype=np.int64)
    n = len(reps_a)
    V = max(1, len(views.vocab))
    prec, pword = _record_word_pairs(views, reps_a, V)
    keep_pair = np.ones(len(prec), dtype=bool)
    fallback = np.zeros(n, dtype=bool)
    common_flag = fu = frec = None
    found: dict[str, list[str]] = {}
    if boilerplate_df:
        file_ids: dict[str, int] = {}
        frec = np.array([file_ids.setdefault(records[i].path, len(file_ids)) for i in reps], dtype=np.int64)
        nf = np.bincount(frec, minlength=len(file_ids))
        fk = frec[prec] * V + pword
        fu, fc = sorted_unique(fk, counts=True)
        f_of = fu // V
        common_flag = (nf[f_of] >= min_records) & (fc >= boilerplate_df * nf[f_of])
        del fc, f_of
        if common_flag.any():
            is_bp = common_flag[np.searchsorted(fu, fk)]
            del fk
            full_n = np.bincount(prec, minlength=n)
            red_n = np.bincount(prec[~is_bp], minlength=n)
            fallback = red_n < np.maximum(3, 0.2 * full_n)
            keep_pair = ~is_bp | fallback[prec]
            names = {v: k for k, v in file_ids.items()}
            for key in fu[common_flag][:2000]:
                found.setdefault(names[int(key // V)], []).append(views.word(int(key % V)))
        else:
            common_flag = None
    if k == 1:
        srec, vals = prec[keep_pair], pword[keep_pair]  # word ids: exact set members (int32)
        del prec, pword, keep_pair
        vocab_hash = np.fromiter((sha1_hash32(w.encode("utf-8", "surrogatepass")) for w in views.vocab), dtype=np.uint32,
                                 count=len(views.vocab))
        hashes = vocab_hash[vals]
    else:
        rec, words = _gather(views, reps_a, 0, n)
        if common_flag is not None:  # drop template words from the word sequence, then window it
            seq_bp = common_flag[np.searchsorted(fu, frec[rec] * V + words)] & ~fallback[rec]
            words, rec = words[~seq_bp], rec[~seq_bp]
        w = words.astype(np.uint64) + np.uint64(1)
        m = len(w) - k + 1
        g_vals = np.zeros(0, np.uint64)
        g_rec = np.zeros(0, np.int64)
        if m > 0:
            acc = np.zeros(m, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for t in range(k):
                    acc = _fmix64(acc * np.uint64(0x100000001B3) ^ w[t:t + m])
            valid = rec[:m] == rec[k - 1:]  # windows inside one record
            g_vals, g_rec = acc[valid], rec[:m][valid]
        short = np.bincount(rec, minlength=n) < k  # records of fewer than k words: their words are the shingles
        sel = short[rec]
        with np.errstate(over="ignore"):
            vals = np.concatenate([g_vals, _fmix64(w[sel])])
        srec = np.concatenate([g_rec, rec[sel]])
        order = np.lexsort((vals, srec))
        vals, srec = vals[order], srec[order]
        dup = np.zeros(len(vals), dtype=bool)
        dup[1:] = (vals[1:] == vals[:-1]) & (srec[1:] == srec[:-1])
        vals, srec = vals[~dup], srec[~dup]
        hashes = (vals >> np.uint64(32)).astype(np.uint32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(srec, minlength=n), out=offsets[1:])
    return vals, hashes, offsets, found


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures (n x num_perm, uint32) of the sets hashes[offsets[i]:offsets[i+1]].

    Same values as datasketch's affine32 scheme: min over the set of (a * fmix32(h) + b) mod 2^32.
    One permutation at a time over all sets: a contiguous 1-D reduceat per permutation is
    ~25x faster than one 2-D reduceat over a (values x permutations) matrix (measured).
    Every set must be non-empty.
    """
    from datasketch import MinHash

    a, b = (np.asarray(x, dtype=np.uint32) for x in MinHash(num_perm=num_perm, seed=seed).permutations)
    n = len(offsets) - 1
    sig = np.empty((n, num_perm), dtype=np.uint32)
    mixed = _fmix32(hashes.astype(np.uint32))
    starts = offsets[:-1].astype(np.intp)
    x = np.empty_like(mixed)
    with np.errstate(over="ignore"):
        for p in range(num_perm):
            np.multiply(mixed, a[p], out=x)
            x += b[p]
            sig[:, p] = np.minimum.reduceat(x, starts)
    return sig


def _jaccard(values: np.ndarray, offsets: np.ndarray, p: int, q: int) -> float:
    A = values[offsets[p]:offsets[p + 1]]
    B = values[offsets[q]:offsets[q + 1]]
    inter = np.intersect1d(A, B, assume_unique=True).size
    return inter / (len(A) + len(B) - inter)


def band_buckets(sig: np.ndarray, bands: int, rows: int) -> Iterator[np.ndarray]:
    """Buckets of an LSH index: per band, the records whose ``rows`` signature values in that
    band are all equal (the grouping of ``datasketch.MinHashLSH(params=(bands, rows))``, done
    with one sort per band instead of 100k Python inserts; the band is hashed to 64 bits, so
    an unrelated collision only adds a candidate that the exact Jaccard then rejects)."""
    n = len(sig)
    for i in range(bands):
        block = sig[:, i * rows:(i + 1) * rows].astype(np.uint64)
        h = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(rows):
                h = _fmix64(h * np.uint64(0x9E3779B97F4A7C15) + block[:, j] + np.uint64(1))
        order = np.argsort(h, kind="stable")
        hs = h[order]
        cut = np.flatnonzero(hs[1:] != hs[:-1]) + 1
        lo = np.concatenate([[0], cut])
        hi = np.concatenate([cut, [n]])
        for a, b in zip(lo[hi - lo >= 2].tolist(), hi[hi - lo >= 2].tolist()):
            yield np.sort(order[a:b])


def datasketch_buckets(sig: np.ndarray, bands: int, rows: int, seed: int) -> Iterator[np.ndarray]:
    """The same buckets from datasketch's own ``MinHashLSH`` index (slower: one insert per record)."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=sig.shape[1], params=(bands, rows))
    for j in range(len(sig)):
        lsh.insert(j, LeanMinHash(seed=seed, hashvalues=sig[j], scheme="affine32"), check_duplication=False)
    for table in lsh.hashtables:
        for key in table.keys():
            members = table.get(key)
            if len(members) > 1:
                yield np.array(sorted(members))


def find_near_duplicates(records: list[AuditRecord], views: TextViews, threshold: float = 0.8, shingle_size: int = 1,
                         num_perm: int = 128, seed: int = 1, boilerplate_df: Optional[float] = 0.9,
                         index: str = "numpy") -> NearDupResult:
    """Clusters of near-duplicate records (within train, within eval) and train/eval leaks.

    ``index``: "numpy" (vectorised banding) or "datasketch" (MinHashLSH); same buckets.
    """
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
    values, hashes, offsets, res.boilerplate = shingle_sets(reps, records, views, shingle_size, boilerplate_df)
    t1 = time.perf_counter()
    sig = signatures(hashes, offsets, num_perm, seed)
    t2 = time.perf_counter()

    b, r = band_params(threshold, num_perm)
    res.bands, res.rows = b, r
    buckets = band_buckets(sig, b, r) if index == "numpy" else datasketch_buckets(sig, b, r, seed)
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

    for members in buckets:
        members = members.tolist()
        if len(members) <= _BIG_BUCKET:
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    check(members[x], members[y])
        else:
            # A huge bucket (thousands of near-identical records): compare each member with
            # the leaders found so far instead of all pairs.
            leaders: list[int] = []
            for m in members:
                if not any(check(lead, m) is not None for lead in leaders[:_BIG_BUCKET]):
                    leaders.append(m)
    res.candidates = len(cand)
    res.confirmed = len(confirmed)
    t3 = time.perf_counter()

    uf = _UnionFind(n)
    best_leak: dict[int, tuple[int, float]] = {}
    for p, q, j in confirmed:
        rp, rq = records[reps[p]], records[reps[q]]
        if rp.split == rq.split:
            uf.union(p, q)
        else:  # train/eval pair: leakage, not a cluster to clean
            e, t = (rp, rq) if rp.split == "eval" else (rq, rp)
            if e.idx not in best_leak or j > best_leak[e.idx][1]:
                best_leak[e.idx] = (t.idx, j)
    low: dict[int, float] = {}
    for p, q, j in confirmed:
        if records[reps[p]].split == records[reps[q]].split:
            root = uf.find(p)
            low[root] = min(low.get(root, 1.0), j)
    comps: dict[int, list[int]] = {}
    for root in {uf.find(p) for p, _, _ in confirmed} | {uf.find(q) for _, q, _ in confirmed}:
        comps[root] = []
    for j in range(n):
        root = uf.find(j)
        if root in comps:
            comps[root].append(reps[j])
    clusters = [(sorted(c), low.get(root, 1.0)) for root, c in comps.items() if len(c) > 1]
    clusters.sort(key=lambda c: (-len(c[0]), c[0][0]))
    res.clusters = [c for c, _ in clusters]
    res.cluster_jaccard = [round(j, 4) for _, j in clusters]
    res.leaks = sorted((e, t, j) for e, (t, j) in best_leak.items())
    res.seconds = {"shingles": round(t1 - t0, 3), "signatures": round(t2 - t1, 3), "lsh_and_verify": round(t3 - t2, 3),
                   "clusters": round(time.perf_counter() - t3, 3)}
    return res


def findings(res: NearDupResult, records: list[AuditRecord]) -> FindingList:
    out = FindingList()
    redundant = sum(len(c) - 1 for c in res.clusters)
    if redundant:
        out.add("near_duplicate", WARNING,
                f"{redundant} records are near-duplicates of another record (Jaccard >= {res.threshold:g} over "
                f"{'single-word' if res.shingle_size == 1 else f'{res.shingle_size}-word'} shingles) in {len(res.clusters)} clusters; "
                f"the largest has {len(res.clusters[0])} records",
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
        "boilerplate_words": res.boilerplate,
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
