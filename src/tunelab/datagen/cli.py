"""The ``self-instruct`` and ``augment`` verbs: their flags and the printed summaries."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from .backend import add_backend_args, backend_from_args


def add_self_instruct_parser(sub: Any, func: Callable) -> argparse.ArgumentParser:
    from .selfinstruct import SelfInstructOptions

    d = SelfInstructOptions()
    p = sub.add_parser("self-instruct", help="generate instruction data from seed tasks (Wang et al. 2022)")
    p.add_argument("--seed-tasks", required=True, help="seed tasks .jsonl ({instruction, instances, is_classification} or alpaca)")
    p.add_argument("--n", type=int, required=True, help="generated records to reach (a rerun with the same --out resumes)")
    p.add_argument("--out", required=True, help="output .jsonl (alpaca records with provenance); appended to")
    p.add_argument("--k", type=int, default=d.k, help=f"in-context instructions per prompt (default {d.k})")
    p.add_argument("--machine-k", type=int, default=d.machine_k, help=f"of which generated ones (default {d.machine_k})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"instruction prompts per round (default {d.batch_size})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"tokens per instruction answer (default {d.max_tokens})")
    p.add_argument("--instance-max-tokens", type=int, default=d.instance_max_tokens, help=f"tokens per instance answer (default {d.instance_max_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"(default {d.temperature}, as the reference)")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"(default {d.top_p}, as the reference)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the in-context sampling")
    p.add_argument("--no-audit", action="store_true", help="skip the audit summary of the output")
    add_backend_args(p)
    p.set_defaults(func=func)
    return p


def add_augment_parser(sub: Any, func: Callable) -> argparse.ArgumentParser:
    p = sub.add_parser("augment", help="paraphrase or back-translate prompts, keeping completions and provenance")
    p.add_argument("data", help="data file (.jsonl/.json/.csv/.parquet, any supported format)")
    p.add_argument("--paraphrase", type=int, default=0, metavar="N", help="paraphrases per record")
    p.add_argument("--back-translate", metavar="LANG", help="round trip through LANG (e.g. fr, or fr,de); needs a translation-capable model")
    p.add_argument("--out", required=True, help="output .jsonl: the originals (with ids) and their copies (augmented_from)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature of the paraphrases (default 0.9)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per rewritten prompt (default 256)")
    add_backend_args(p)
    p.set_defaults(func=func)
    return p


def _check(cond: bool, msg: str) -> None:
    from ..config import ConfigError

    if not cond:
        raise ConfigError(msg)


def run_self_instruct(args: argparse.Namespace) -> int:
    from .selfinstruct import SelfInstructOptions, load_seed_tasks, self_instruct

    _check(args.n > 0, "--n must be positive")
    _check(0 < args.k and 0 <= args.machine_k < args.k, "--k must be positive and --machine-k in [0, k)")
    _check(args.batch_size > 0, "--batch-size must be positive")
    load_seed_tasks(args.seed_tasks)  # a bad seed file fails before the model loads
    opts = SelfInstructOptions(n=args.n, k=args.k, machine_k=args.machine_k, batch_size=args.batch_size, max_tokens=args.max_tokens,
                               instance_max_tokens=args.instance_max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    backend = backend_from_args(args)
    res = self_instruct(args.seed_tasks, args.out, backend, opts, progress=lambda s: print(s, file=sys.stderr, flush=True))
    st = res.stats
    rejected = ", ".join(f"{k} {v}" for k, v in st["rejected"].items()) or "none"
    print(f"self-instruct: {res.generated} generated records in {res.out} ({res.rounds} rounds, model {st['model']}); "
          f"instructions kept {st['kept']}, rejected: {rejected}" + "".join(f"; {k} {v}" for k, v in st["instances"].items()))
    if not args.no_audit:
        from ..audit.core import run_audit

        print(run_audit([str(res.out)]).summary_text())
    return 0


def run_augment(args: argparse.Namespace) -> int:
    from .augment import augment

    from pathlib import Path

    from ..data.formats import DataError

    _check(args.paraphrase >= 0, "--paraphrase must be >= 0")
    _check(bool(args.paraphrase or args.back_translate), "augment: give --paraphrase N and/or --back-translate LANG")
    if not Path(args.data).exists():  # fail before the model loads
        raise DataError(args.data, "file not found")
    if Path(args.out).exists():
        raise FileExistsError(f"{args.out} exists; augment never overwrites a file, pick a new --out")
    backend = backend_from_args(args)
    _check(args.max_tokens > 0, "--max-tokens must be positive")
    res = augment(args.data, args.out, backend, args.paraphrase, args.back_translate, args.temperature, args.max_tokens,
                  progress=lambda s: print(s, file=sys.stderr, flush=True))
    other = ", ".join(f"{k} {v}" for k, v in sorted(res.counts.items()) if v and k != "augmented")
    print(f"augment: {res.originals} records + {res.augmented} augmented copies written to {res.out}" + (f" ({other})" if other else ""))
    return 0
