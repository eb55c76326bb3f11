"""Benchmark of ``tunelab audit`` at 100k Alpaca-sized records.

    python benchmarks/audit_speed.py                   # 100k train + 1k eval records, embedded tokenizer
    python benchmarks/audit_speed.py --records 20000   # smaller
    python benchmarks/audit_speed.py --no-tokenizer    # word counts instead of tokens

Generates synthetic Alpaca records (instruction / input / output, ~150 words in all) into a
temp dir, with planted exact duplicates (case/punctuation changed), near-duplicates (edits of
1-10% of the words: substitutions, insertions, deletions) and eval records leaked from train.
Words are drawn with a Zipf law from the real English words of the tokenizer's vocabulary, so
that token counts per word are realistic. The audit then runs in a fresh subprocess (so that
its peak RSS is its own) with the defaults of ``tunelab audit`` (embedded SmolLM2 tokenizer,
template auto, max_seq_len 1024, near-duplicate threshold 0.8), and prints the time, records/s,
peak RSS, the time of each stage, and the recall/precision on the planted near-duplicates.
Target: <= 60 s and <= 2 GB RSS on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def english_words(n: int = 20000) -> list[str]:
    """Real words in a plausible frequency order: the tokenizer's whole-word tokens by id
    (BPE merges common words first), else made-up syllable words."""
    try:
        from tunelab.models.load import load_tokenizer, resolve_model_path

        tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        words = [t[1:] for t, _ in vocab if t.startswith("Ġ") and re.fullmatch(r"[a-z]{2,14}", t[1:])]
        if len(words) > 1000:
            return words[:n]
    except Exception:
        pass
    rng = random.Random(0)
    syl = ["ka", "to", "ri", "men", "sa", "lo", "ne", "pu", "ter", "an", "is", "or", "el", "ba", "di"]
    return ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(n)]


class WordStream:
    """Zipf-distributed words, drawn in large blocks (one rng.choice call per million words)."""

    def __init__(self, rng: np.random.Generator, words: list[str], probs: np.ndarray):
        self.rng, self.words, self.probs = rng, words, probs
        self.buf: list[str] = []
        self.pos = 0

    def take(self, n: int) -> list[str]:
        if self.pos + n > len(self.buf):
            self.buf = [self.words[i] for i in self.rng.choice(len(self.words), size=max(n, 1 << 20), p=self.probs)]
            self.pos = 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


def sentence_case(ws: list[str], rng: random.Random) -> str:
    out, start = [], True
    for w in ws:
        out.append(w.capitalize() if start else w)
        start = False
        r = rng.random()
        if r < 0.07:
            out[-1] += "."
            start = True
        elif r < 0.12:
            out[-1] += ","
    return " ".join(out) + "."


def edit(ws: list[str], rate: float, rng: random.Random, words: list[str]) -> list[str]:
    ws = list(ws)
    for _ in range(max(1, round(len(ws) * rate))):
        op = rng.choice(("sub", "ins", "del"))
        i = rng.randrange(len(ws))
        if op == "sub":
            ws[i] = rng.choice(words)
        elif op == "ins":
            ws.insert(i, rng.choice(words))
        elif len(ws) > 2:
            del ws[i]
    return ws


def generate(out: Path, n: int, n_eval: int, n_words: int, near_rate: float, exact_rate: float, seed: int = 0) -> dict:
    words = english_words()
    ranks = np.arange(1, len(words) + 1)
    probs = 1 / ranks ** 1.05
    probs /= probs.sum()
    stream = WordStream(np.random.default_rng(seed), words, probs)
    rng = random.Random(seed)
    raw: list[tuple[list[str], list[str], list[str]]] = []  # (instruction, input, output) word lists
    planted_near: list[tuple[int, int]] = []
    exact = 0
    for i in range(n):
        r = rng.random()
        if i > 10 and r < near_rate:
            j = rng.randrange(i)
            src = raw[j]
            # edit 1-10% of the words of the whole record, spread over its fields
            rate = rng.uniform(0.01, 0.10)
            raw.append(tuple(edit(part, rate, rng, words) if part else part for part in src))
            planted_near.append((j, i))
        elif i > 10 and r < near_rate + exact_rate:
            raw.append(raw[rng.randrange(i)])
            exact += 1
        else:
            k_ins = max(3, int(n_words * 0.1))
            k_in = int(n_words * 0.15) if rng.random() < 0.5 else 0
            k_out = n_words - k_ins - k_in + rng.randint(-20, 20)
            raw.append((stream.take(k_ins), stream.take(k_in), stream.take(k_out)))
    train = out / "train.jsonl"
    with open(train, "w") as fh:
        for ins, inp, outp in raw:
            fh.write(json.dumps({"instruction": sentence_case(ins, rng).rstrip(".") + "?", "input": sentence_case(inp, rng) if inp else "",
                                 "output": sentence_case(outp, rng)}) + "\n")
    leaked = []
    with open(out / "eval.jsonl", "w") as fh:
        for e in range(n_eval):
            if rng.random() < 0.05:
                j = rng.randrange(n)
                ins, inp, outp = (edit(p, 0.03, rng, words) if p else p for p in raw[j])
                leaked.append((e, j))
            else:
                ins, inp, outp = (stream.take(15), [], stream.take(130))
            fh.write(json.dumps({"instruction": sentence_case(ins, rng), "input": sentence_case(inp, rng) if inp else "",
                                 "output": sentence_case(outp, rng)}) + "\n")
    truth = {"near_pairs": planted_near, "exact": exact, "leaked": leaked, "records": n, "eval_records": n_eval}
    (out / "truth.json").write_text(json.dumps(truth))
    return truth


def run_audit(folder: Path, no_tokenizer: bool) -> None:
    """The measured part: runs in its own process (see main)."""
    t0 = time.perf_counter()
    from tunelab.audit import AuditOptions, load_renderer, run_audit as audit

    renderer, info = (None, {"unit": "words"}) if no_tokenizer else load_renderer("smollm2-135m-instruct", "auto")
    t1 = time.perf_counter()
    c1 = os.times()
    rep = audit([folder / "train.jsonl"], [folder / "eval.jsonl"], renderer=renderer, tokenizer_info=info,
                options=AuditOptions(spot_check_path=str(folder / "spot.html")))
    t2 = time.perf_counter()
    c2 = os.times()
    truth = json.loads((folder / "truth.json").read_text())
    recs = rep.records
    # Planted near-duplicate pairs (train line numbers are record index + 1): found when both
    # records sit in one cluster, or one is an exact copy of the other.
    where_cluster = {}
    for k, c in enumerate(rep.results["near"].clusters):
        for i in c:
            where_cluster[i] = k
    dup_of = {}
    for g in rep.results["dups"].groups:
        for i in g:
            dup_of[i] = g[0]
    canon = lambda i: dup_of.get(i, i)  # noqa: E731
    found = sum(1 for a, b in truth["near_pairs"]
                if canon(a) == canon(b) or (where_cluster.get(canon(a)) is not None and where_cluster.get(canon(a)) == where_cluster.get(canon(b))))
    planted_ids = {canon(i) for p in truth["near_pairs"] for i in p}
    # precision: clustered records that are not part of a planted pair (chance collisions)
    clustered = {i for c in rep.results["near"].clusters for i in c}
    false = len([i for i in clustered if i not in planted_ids])
    out = {
        "records": len(recs),
        "audit_seconds": round(t2 - t1, 2),
        "tokenizer_load_seconds": round(t1 - t0, 2),
        "total_seconds": round(t2 - t0, 2),
        "records_per_second": round(len(recs) / (t2 - t1)),
        "audit_cpu_seconds": round((c2.user - c1.user) + (c2.system - c1.system), 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "stages": rep.timings,
        "near_dup_stages": rep.results["near"].seconds,
        "tokens": {"unit": rep.sections["lengths"]["unit"], "total": rep.sections["lengths"]["total"],
                   "counted_fast": rep.sections["lengths"]["counted_fast"], "counted_slow": rep.sections["lengths"]["counted_slow"]},
        "planted_near_pairs": len(truth["near_pairs"]),
        "planted_near_recall": round(found / max(1, len(truth["near_pairs"])), 4),
        "clustered_records_not_planted": false,
        "leaked_planted": len(truth["leaked"]),
        "leaked_found": rep.sections["leakage"]["eval_records_leaked"],
        "findings": {f.code: f.count for f in rep.findings},
        "exit_code": rep.exit_code,
    }
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--eval-records", type=int, default=1000)
    ap.add_argument("--words", type=int, default=150, help="words per record")
    ap.add_argument("--near-dup-rate", type=float, default=0.05)
    ap.add_argument("--exact-dup-rate", type=float, default=0.01)
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--keep", help="generate into this folder and keep it")
    ap.add_argument("--_run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        run_audit(Path(args._run), args.no_tokenizer)
        return
    tmp = tempfile.TemporaryDirectory(prefix="audit-bench-") if not args.keep else None
    folder = Path(args.keep or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    truth = generate(folder, args.records, args.eval_records, args.words, args.near_dup_rate, args.exact_dup_rate)
    size = (folder / "train.jsonl").stat().st_size
    print(f"generated {truth['records']} train + {truth['eval_records']} eval records ({size / 1e6:.0f} MB, "
          f"{len(truth['near_pairs'])} planted near-duplicates, {truth['exact']} exact copies, {len(truth['leaked'])} leaked) "
          f"in {time.perf_counter() - t:.1f}s", flush=True)
    cmd = [sys.executable, __file__, "--_run", str(folder)] + (["--no-tokenizer"] if args.no_tokenizer else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        sys.exit(proc.returncode)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"audit of {res['records']} records: {res['audit_seconds']} s ({res['records_per_second']} records/s), "
          f"+ {res['tokenizer_load_seconds']} s loading the tokenizer = {res['total_seconds']} s; peak RSS {res['peak_rss_mb']} MB; "
          f"{os.cpu_count()} CPUs")
    print(f"CPU time of the audit (user+sys, all threads): {res['audit_cpu_seconds']} s; "
          f"load average at the end (other processes included): {res['load_average']}")
    print("stages (s):", json.dumps(res["stages"]))
    print("near-duplicate stages (s):", json.dumps(res["near_dup_stages"]))
    print(f"lengths in {res['tokens']['unit']}: total {json.dumps(res['tokens']['total'])}; "
          f"fast path {res['tokens']['counted_fast']}, slow path {res['tokens']['counted_slow']}")
    print(f"planted near-duplicate pairs: {res['planted_near_pairs']}, recall {res['planted_near_recall']}; "
          f"clustered records outside planted pairs: {res['clustered_records_not_planted']}; "
          f"leaked eval records planted {res['leaked_planted']}, reported {res['leaked_found']}")
    print("findings:", json.dumps(res["findings"]))
    print(json.dumps(res))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
