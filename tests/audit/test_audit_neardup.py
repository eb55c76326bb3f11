"""Near-duplicates: datasketch-identical MinHash, LSH buckets, recall/precision on planted
near-duplicates (edits of <= 10% of the words), templates, leakage."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from audit_helpers import VOCAB, alpaca, audit, write_jsonl

from tunelab.audit import neardup
from tunelab.audit.normalize import build_views
from tunelab.audit.reader import read_file
from tunelab.audit.schema import check_and_convert
from tunelab.audit.findings import Tally

WEIGHTS = [1 / (k + 1) for k in range(len(VOCAB))]  # Zipf-like: common words are common


def sentence(rng: random.Random, n: int) -> list[str]:
    return rng.choices(VOCAB, WEIGHTS, k=n)


def edit(words: list[str], frac: float, rng: random.Random) -> list[str]:
    """Edit ``frac`` of the words: substitutions, insertions and deletions."""
    w = list(words)
    for _ in range(max(1, round(frac * len(words)))):
        op, i = rng.choice("sid"), rng.randrange(len(w))
        if op == "s":
            w[i] = rng.choice(VOCAB)
        elif op == "i":
            w.insert(i, rng.choice(VOCAB))
        elif len(w) > 2:
            del w[i]
    return w


def planted(tmp_path, n_base=400, n_copies=200, seed=0):
    """n_base distinct records, then n_copies near-duplicates of random earlier records."""
    rng = random.Random(seed)
    words: list[tuple[list[str], list[str]]] = []
    group: list[int] = []
    for i in range(n_base):
        words.append((sentence(rng, rng.randint(8, 20)), sentence(rng, rng.randint(60, 130))))
        group.append(i)
    for _ in range(n_copies):
        j = rng.randrange(len(words))
        frac = rng.uniform(0.01, 0.10)
        ins, out = words[j]
        # the edit rate applies to the record's words as a whole
        words.append((edit(ins, frac, rng), edit(out, frac, rng)))
        group.append(group[j])
    order = list(range(len(words)))
    rng.shuffle(order)
    rows = [alpaca(" ".join(words[k][0]).capitalize() + "?", " ".join(words[k][1]).capitalize() + ".") for k in order]
    f = write_jsonl(tmp_path / "planted.jsonl", rows)
    truth = [group[k] for k in order]  # truth[line - 1] = the original this record derives from
    return f, truth


def test_signatures_are_datasketch_minhash():
    from datasketch import MinHash
    from datasketch.hashfunc import sha1_hash32

    rng = random.Random(1)
    sets = [sorted(set(sentence(rng, rng.randint(1, 60)))) for _ in range(30)]
    hashes = np.array([sha1_hash32(w.encode()) for s in sets for w in s], dtype=np.uint32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    sig = neardup.signatures(hashes, offsets, 128, seed=1)
    for s, row in zip(sets, sig):
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([w.encode() for w in s])
        assert np.array_equal(m.hashvalues, row)


def test_numpy_buckets_equal_datasketch_minhashlsh(tmp_path):
    f, _ = planted(tmp_path, 150, 60, seed=3)
    info, recs = read_file(str(f), "train", "auto", None, 0, [])
    check_and_convert(recs, info, Tally())
    views = build_views(recs)
    reps = [r.idx for r in recs]
    values, hashes, offsets, _ = neardup.shingle_sets(reps, recs, views, 1, None)
    sig = neardup.signatures(hashes, offsets, 128, 1)
    b, r = neardup.band_params(0.8, 128)
    ours = {frozenset(x.tolist()) for x in neardup.band_buckets(sig, b, r)}
    theirs = {frozenset(x.tolist()) for x in neardup.datasketch_buckets(sig, b, r, 1)}
    assert ours == theirs and len(ours) > 50


def test_band_params_favour_recall_at_the_threshold():
    for t in (0.7, 0.8, 0.9):
        b, r = neardup.band_params(t, 128)
        assert b * r <= 128
        assert 1 - (1 - t ** r) ** b >= 0.98
    b, r = neardup.band_params(0.8, 128)
    assert 1 - (1 - 0.3 ** r) ** b < 0.01  # at the default, unrelated texts rarely become candidates


def test_planted_near_duplicates_recall_and_precision(tmp_path):
    f, truth = planted(tmp_path)
    rep = audit([f])
    clusters = rep.results["near"].clusters
    line_of = {r.idx: r.line for r in rep.records}
    predicted = {frozenset((line_of[a], line_of[b])) for c in clusters for a, b in itertools.combinations(c, 2)}
    by_group: dict[int, list[int]] = {}
    for line, g in enumerate(truth, start=1):
        by_group.setdefault(g, []).append(line)
    true = {frozenset(p) for lines in by_group.values() for p in itertools.combinations(lines, 2)}
    hit = len(predicted & true)
    recall, precision = hit / len(true), hit / max(1, len(predicted))
    print(f"planted near-duplicate pairs: {len(true)}, found {len(predicted)}, recall {recall:.3f}, precision {precision:.3f}")
    assert recall >= 0.95
    assert precision >= 0.95
    (f_,) = rep.finding("near_duplicate")
    assert f_.severity == "warning" and f_.count == sum(len(c) - 1 for c in clusters)
    assert rep.sections["near_duplicates"]["clusters"][0]["examples"]


def test_near_duplicate_leakage_between_train_and_eval(tmp_path):
    rng = random.Random(5)
    base = [(sentence(rng, 12), sentence(rng, 90)) for _ in range(60)]
    train = write_jsonl(tmp_path / "train.jsonl", [alpaca(" ".join(a), " ".join(b)) for a, b in base])
    leaked = [alpaca(" ".join(edit(a, 0.05, rng)), " ".join(edit(b, 0.05, rng))) for a, b in base[:5]]
    fresh = [alpaca(" ".join(sentence(rng, 12)), " ".join(sentence(rng, 90))) for _ in range(20)]
    ev = write_jsonl(tmp_path / "eval.jsonl", leaked + fresh)
    rep = audit([train], [ev])
    (leak,) = rep.finding("train_eval_leakage")
    assert leak.severity == "error"
    assert set(leak.examples) == {f"{ev}:{k}" for k in range(1, 6)}
    near = [p for p in rep.sections["leakage"]["pairs"] if p["kind"] == "near"]
    assert {p["train"] for p in near} == {f"{train}:{k}" for k in range(1, 6)}
    assert all(p["jaccard"] >= 0.8 for p in near)
    assert not rep.finding("near_duplicate")  # train/eval pairs are leakage, not clusters to clean


def test_shared_template_is_not_a_near_duplicate(tmp_path):
    """T0-style templated records share most of their words; only the filled-in part counts."""
    rng = random.Random(7)
    template = "Humans can easily string together abstract concepts to form a coherent sentence. For example, with the concepts {}, a simple sentence can be"
    rows = []
    for _ in range(120):
        concepts = rng.sample(VOCAB[200:], 3)
        rows.append({"prompt": template.format(", ".join(concepts)), "completion": " ".join(rng.sample(VOCAB[200:], 5))})
    rows.append(dict(rows[7], completion=rows[7]["completion"] + " again"))  # a real near-duplicate
    f = write_jsonl(tmp_path / "t0.jsonl", rows)
    rep = audit([f])
    assert [len(c) for c in rep.results["near"].clusters] == [2]
    assert "humans" in rep.sections["near_duplicates"]["boilerplate_words"][str(f)]


def test_file_of_near_identical_records_is_still_caught(tmp_path):
    """When every word is 'template' (all records near-identical), records keep their words."""
    rng = random.Random(9)
    base = sentence(rng, 80)
    rows = [alpaca("Describe it.", " ".join(edit(base, 0.03, rng))) for _ in range(60)]
    f = write_jsonl(tmp_path / "same.jsonl", rows)
    rep = audit([f])
    (nd,) = rep.finding("near_duplicate")
    assert nd.count >= 55


@pytest.mark.parametrize("k", [2, 3])
def test_longer_shingles_work(tmp_path, k):
    rng = random.Random(11)
    base = [(sentence(rng, 10), sentence(rng, 100)) for _ in range(40)]
    rows = [alpaca(" ".join(a), " ".join(b)) for a, b in base]
    rows.append(alpaca(" ".join(base[3][0]), " ".join(base[3][1][:-1])))  # one word dropped at the end
    f = write_jsonl(tmp_path / "k.jsonl", rows)
    rep = audit([f], shingle_size=k)
    assert [sorted(r.line for r in rep.records if r.idx in c) for c in rep.results["near"].clusters] == [[4, 41]]
