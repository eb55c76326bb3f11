"""Self-instruct filters on crafted cases, and the ROUGE-L index against brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tunelab.datagen.filters import InstructionFilter, NearDupIndex, heuristic_reason
from tunelab.datagen.rouge import RougeIndex, lcs_length, rouge_l, tokens


def _lcs_reference(a, b):
    """Textbook full-table LCS."""
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


def test_rouge_l_is_the_lcs_f_measure():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcdef") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 12))]
        assert lcs_length(a, b) == _lcs_reference(a, b)
    assert tokens("Write a Poem, about the SEA!") == ["write", "a", "poem", "about", "the", "sea"]
    # precision 6/6, recall 6/7: F = 2 * 6 / 13
    assert rouge_l(tokens("Write a poem about the sea."), tokens("Write a short poem about the sea.")) == pytest.approx(12 / 13)


def test_rouge_index_matches_brute_force():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(40)]
    pool = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 15))) for _ in range(300)]
    idx = RougeIndex()
    for p in pool:
        idx.add(p)
    for _ in range(60):
        base = rng.choice(pool).split()
        cand = " ".join(w if rng.random() > 0.3 else rng.choice(vocab) for w in base)
        brute = max(rouge_l(tokens(cand), tokens(p)) for p in pool)
        best, arg = idx.best(cand)
        assert best == pytest.approx(brute) and rouge_l(tokens(cand), tokens(pool[arg])) == pytest.approx(brute)
        hit, _ = idx.best(cand, 0.7)
        assert (hit >= 0.7) == (brute >= 0.7)
    # the bound rules most of the pool out: far fewer exact scores than candidates x pool
    assert idx.exact_scored < 60 * 2 * len(pool) * 0.5
    assert idx.best("nothing in common here")[1] is None


def test_heuristic_filters():
    assert heuristic_reason("Do it now") == "too_short"  # 3 words
    assert heuristic_reason("Do it right now") is None  # 4 words: kept
    assert heuristic_reason(" ".join(["word"] * 151)) == "too_long"
    assert heuristic_reason(" ".join(["word"] * 150)) is None
    assert heuristic_reason("Draw a cat sitting on a mat") == "blacklisted_keyword"
    assert heuristic_reason("Describe the attached IMAGE in detail") == "blacklisted_keyword"
    assert heuristic_reason("Explain how to go to the station") == "blacklisted_keyword"
    assert heuristic_reason("Update your profile summary for a job site") is None  # whole words only: profile is not file
    assert heuristic_reason("Write a program that sorts numbers") == "program_request"
    assert heuristic_reason("- List three kinds of fruit") == "starts_with_punctuation"
    assert heuristic_reason("Écris une phrase sur la mer") == "non_ascii_start"


def test_instruction_filter_counts_each_reason():
    f = InstructionFilter()
    f.add("Write a poem about the sea in four lines.")
    offers = {
        "Write a short and simple poem about the sea in four lines.": "rouge_similar",  # Jaccard 9/12 < 0.8
        "write a POEM about the sea, in four lines!": "exact_duplicate",
        # the same words reversed: ROUGE-L is low, the word sets are equal
        "lines four in sea the about poem a write": "near_duplicate",
        "Plot the sales figures of last year": "blacklisted_keyword",
        "Hi there": "too_short",
        "Suggest three names for a bakery that sells bread.": None,
        "Suggest three names for a bakery that sells fresh bread and cakes.": "rouge_similar",  # against the one just kept
    }
    for text, why in offers.items():
        assert f.reason(text) == why, text
        assert f.offer(text) == (why is None)
    assert f.stats() == {"kept": 1, "rejected": {"too_short": 1, "blacklisted_keyword": 1, "exact_duplicate": 1, "near_duplicate": 1,
                                                  "rouge_similar": 2}}
    assert rouge_l(tokens("lines four in sea the about poem a write"), tokens("Write a poem about the sea in four lines.")) < 0.7


def test_near_dup_index_finds_pairs_at_the_audit_threshold():
    idx = NearDupIndex()
    assert idx.threshold == 0.8  # the audit's default near-duplicate threshold
    base = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    idx.add(base)
    j, k = idx.find("alpha beta gamma delta epsilon zeta eta theta iota lambda")  # Jaccard 9/11
    assert k == 0 and j == pytest.approx(9 / 11)
    assert idx.find("alpha beta gamma delta epsilon zeta eta theta mu nu")[1] is None  # 8/12
    assert idx.find("something else entirely")[1] is None
    # the signature is the audit's, bit for bit
    from datasketch.hashfunc import sha1_hash32

    from tunelab.audit.neardup import signatures

    ws = frozenset(base.split())
    h = np.fromiter((sha1_hash32(w.encode()) for w in ws), dtype=np.uint32)
    assert np.array_equal(idx._signature(ws), signatures(h, np.array([0, len(h)]), idx.num_perm, idx.seed)[0])
