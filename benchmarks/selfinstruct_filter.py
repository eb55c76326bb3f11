"""Benchmark of the self-instruct ROUGE-L filter on a 20k-instruction pool.

    python benchmarks/selfinstruct_filter.py                  # 20k pool, 2000 candidates
    python benchmarks/selfinstruct_filter.py --pool 5000

The reference implementation (Wang et al. 2022) scores every candidate against the whole pool,
O(pool) Python LCS work per candidate. tunelab's ``RougeIndex`` bounds the LCS of every pool
instruction at once from a token inverted index (numpy) and scores exactly only those whose
bound reaches 0.7. This prints candidates/s for the index, for the whole filter (length,
keywords, exact and near duplicates, ROUGE-L), and for the brute force on a sample, and checks
that index and brute force decide the same on that sample.

Instructions are synthetic: 6-30 words drawn with a Zipf law from the words of the real seed
tasks (``../shared/data/seed_tasks.jsonl`` when present, else a built-in list), so frequent
words ("the", "a", "of") have long posting lists as in real data. Half the candidates are edits
of pool instructions (10-40% of the words changed), half are new.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunelab.datagen.filters import InstructionFilter  # noqa: E402
from tunelab.datagen.rouge import RougeIndex, rouge_l, tokens  # noqa: E402

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "seed_tasks.jsonl"
FALLBACK = ("the a of to and in for is on with that this write list give explain describe find name generate create make "
            "what how why which who when sentence word words text story poem email letter summary question answer example "
            "examples number numbers list items article paragraph title topic idea ideas plan tips reasons ways steps people "
            "country city food book movie song game product company customer student teacher friend family day week year "
            "good bad best new old short long simple three five ten following given each every into about from between").split()


def vocabulary() -> list[str]:
    if SEEDS.exists():
        counts: dict[str, int] = {}
        for line in SEEDS.read_text().splitlines():
            for w in re.findall(r"[A-Za-z']+", json.loads(line)["instruction"].lower()):
                counts[w] = counts.get(w, 0) + 1
        return sorted(counts, key=lambda w: -counts[w])
    return FALLBACK


def make(rng: random.Random, vocab: list[str], weights: list[float]) -> str:
    return " ".join(rng.choices(vocab, weights, k=rng.randint(6, 30))).capitalize() + "."


def edit(rng: random.Random, text: str, vocab: list[str], weights: list[float]) -> str:
    ws = text.rstrip(".").split()
    rate = rng.uniform(0.1, 0.4)
    out = [rng.choices(vocab, weights)[0] if rng.random() < rate else w for w in ws]
    return " ".join(out).capitalize() + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--candidates", type=int, default=2000)
    ap.add_argument("--brute-sample", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    vocab = vocabulary()
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    pool = [make(rng, vocab, weights) for _ in range(args.pool)]
    cands = [edit(rng, rng.choice(pool), vocab, weights) if i % 2 == 0 else make(rng, vocab, weights) for i in range(args.candidates)]
    print(f"vocabulary {len(vocab)} words ({'seed tasks' if SEEDS.exists() else 'built-in list'}); pool {len(pool)}; candidates {len(cands)}")

    t = time.perf_counter()
    idx = RougeIndex()
    for p in pool:
        idx.add(p)
    print(f"index build: {time.perf_counter() - t:.2f} s ({len(pool) / (time.perf_counter() - t):.0f} instructions/s)")

    t = time.perf_counter()
    decisions = [idx.best(c, 0.7)[0] >= 0.7 for c in cands]
    dt = time.perf_counter() - t
    print(f"ROUGE-L index: {len(cands) / dt:.1f} candidates/s ({sum(decisions)} of {len(cands)} at >= 0.7; "
          f"{idx.exact_scored / len(cands):.1f} exact LCS per candidate instead of {len(pool)})")

    filt = InstructionFilter()
    for p in pool:
        filt.add(p)
    t = time.perf_counter()
    for c in cands:
        filt.reason(c)
    dt_f = time.perf_counter() - t
    print(f"whole filter (length, keywords, exact, near-dup, ROUGE-L): {len(cands) / dt_f:.1f} candidates/s")

    sample = cands[: args.brute_sample]
    pool_tokens = [tokens(p) for p in pool]
    t = time.perf_counter()
    brute = [max(rouge_l(tokens(c), p) for p in pool_tokens) >= 0.7 for c in sample]
    dt_b = time.perf_counter() - t
    agree = brute == decisions[: len(sample)]
    print(f"brute force (O(pool) Python LCS per candidate, the reference's work without its process pool): "
          f"{len(sample) / dt_b:.2f} candidates/s on {len(sample)} candidates; index speedup {(len(cands) / dt) / (len(sample) / dt_b):.0f}x; "
          f"same decisions: {agree}")
    if not agree:
        sys.exit("index and brute force disagree")


if __name__ == "__main__":
    main()
