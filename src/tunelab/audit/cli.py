"""``tunelab audit``: the argparse subcommand and the function that runs it.

    tunelab audit DATA... [--config CONFIG] [--eval EVAL_DATA] [--json OUT] [--sample N] [--fix OUT]

Exit codes: 0 no error findings, 1 at least one error finding (CI gate), 2 usage errors
(a file or config that does not exist, a refused --fix target).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from ..config import DataConfig
from ..data.formats import FORMATS
from ..data.render import TRAIN_ON_CHOICES

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SPOT_CHECK = "audit-spotcheck.html"


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    a = subparsers.add_parser(
        "audit",
        help="audit training data: schema, duplicates, near-duplicates, leakage, balance, lengths, artifacts",
        description="Audit fine-tuning data before training. Exit code 1 when a finding of error severity exists.",
    )
    a.add_argument("data", nargs="*", metavar="DATA", help="data files (.jsonl .json .csv .parquet); default: the config's data.train")
    a.add_argument("--config", help="training config: its datasets, model tokenizer, template, max_seq_len and train_on")
    a.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, as for tunelab train (repeatable)")
    a.add_argument("--eval", action="append", metavar="EVAL_DATA", help="eval data, checked for leakage from train (repeatable); default: the config's data.eval")
    a.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="record format of DATA files (default: detected per file)")
    a.add_argument("--json", metavar="OUT", help="write the machine-readable report (schema: docs/audit.md); '-' for stdout")
    a.add_argument("--sample", type=int, default=100, metavar="N", help="records in the spot check (default 100; 0 = none)")
    a.add_argument("--spot-check", default=None, metavar="PATH",
                   help=f"spot-check file, .html or .md (default: {DEFAULT_SPOT_CHECK} next to the --json report, "
                        f"else in the config's run dir, else in runs/audit-<first data file>/)")
    a.add_argument("--seed", type=int, default=None, help="seed of the spot-check sample and --balance (default: train.seed of the config, else 0)")
    a.add_argument("--fix", metavar="OUT", help="write a cleaned copy (JSONL of the original records): a .jsonl file, or a folder with one file per input")
    a.add_argument("--apply-review", metavar="MARKS.csv",
                   help="with --fix: apply the reviewer's marks exported from the spot-check page (drop: left out; fix: left out and written to OUT.to-fix.jsonl)")
    a.add_argument("--balance", choices=("cap", "upsample"), help="with --fix: cap majority classes, or upsample minority ones")
    a.add_argument("--balance-ratio", type=float, default=1.0, help="with --balance: the max/min class ratio to reach (default 1)")
    a.add_argument("--near-dup-threshold", type=float, default=0.8, help="Jaccard threshold of near-duplicates (default 0.8)")
    a.add_argument("--shingle-size", type=int, default=1, help="words per shingle for near-duplicates (default 1)")
    a.add_argument("--no-near-dups", action="store_true", help="skip the near-duplicate check")
    a.add_argument("--imbalance-threshold", type=float, default=10.0, help="warn when the max/min class ratio exceeds this (default 10)")
    a.add_argument("--model", default=None, help=f"model whose tokenizer measures lengths (default: the config's, else {DEFAULT_MODEL})")
    a.add_argument("--template", default=None, help="template (default: the config's, else auto)")
    a.add_argument("--max-seq-len", type=int, default=None, help="max_seq_len (default: the config's, else 1024)")
    a.add_argument("--train-on", choices=TRAIN_ON_CHOICES, default=None, help=f"trained tokens (default: the config's, else {DataConfig.train_on})")
    a.add_argument("--length-sample", type=int, default=10000, metavar="N",
                   help="above N records, length percentiles come from a seeded sample of N (over-limit counts stay exact); 0 = tokenize all")
    a.add_argument("--no-tokenizer", action="store_true", help="count words instead of tokens (no tokenizer is loaded)")
    a.add_argument("--quiet", action="store_true", help="print only the one-screen summary")
    a.set_defaults(func=run_audit_command)
    return a


def spot_check_path(args: argparse.Namespace, cfg: Any = None) -> Path:
    """Where the spot check goes: --spot-check; next to the --json report; the config's run
    dir; else runs/audit-<stem of the first data file>/ (never the working directory itself)."""
    if args.spot_check:
        return Path(args.spot_check)
    if args.json and args.json != "-":
        return Path(args.json).parent / DEFAULT_SPOT_CHECK
    if cfg is not None:
        return cfg.run_dir / DEFAULT_SPOT_CHECK
    first = Path(args.data[0]).stem if args.data else "data"
    return Path("runs") / f"audit-{first}" / DEFAULT_SPOT_CHECK


def build_options(args: argparse.Namespace, cfg: Any = None) -> Any:
    from .core import AuditOptions

    d = cfg.data if cfg is not None else None
    seed = args.seed if args.seed is not None else (cfg.train.seed if cfg is not None else 0)
    return AuditOptions(
        near_dup_threshold=args.near_dup_threshold,
        shingle_size=args.shingle_size,
        near_dups=not args.no_near_dups,
        imbalance_threshold=args.imbalance_threshold,
        max_seq_len=args.max_seq_len if args.max_seq_len is not None else (d.max_seq_len if d is not None else 1024),
        truncation=d.truncation if d is not None else DataConfig.truncation,
        length_sample=args.length_sample or None,
        sample=args.sample,
        spot_check_path=str(spot_check_path(args, cfg)) if args.sample > 0 else None,
        seed=seed,
    )


def _validate(args: argparse.Namespace) -> Optional[str]:
    if not 0 < args.near_dup_threshold <= 1:
        return f"--near-dup-threshold must be in (0, 1], got {args.near_dup_threshold}"
    if args.shingle_size < 1:
        return f"--shingle-size must be >= 1, got {args.shingle_size}"
    if args.length_sample < 0:
        return f"--length-sample must be >= 0, got {args.length_sample}"
    if args.sample < 0:
        return f"--sample must be >= 0, got {args.sample}"
    if args.balance and not args.fix:
        return "--balance needs --fix OUT"
    if args.apply_review and not args.fix:
        return "--apply-review needs --fix OUT (the cleaned copy the marks are applied to)"
    if args.imbalance_threshold <= 1:
        return f"--imbalance-threshold must be > 1, got {args.imbalance_threshold}"
    if args.max_seq_len is not None and args.max_seq_len < 1:
        return f"--max-seq-len must be >= 1, got {args.max_seq_len}"
    return None


def _fail(msg: str) -> int:
    """A usage error: one unwrapped line on stderr, exit code 2 (as every tunelab verb)."""
    print(f"tunelab: error: {msg}", file=sys.stderr)
    return 2


def run_audit_command(args: argparse.Namespace, console: Any = None) -> int:
    """Run ``tunelab audit``; return the exit code (0 pass, 1 error findings, 2 usage error)."""
    from rich.console import Console

    from ..config import ConfigError, load_config
    from ..data.formats import DataError
    from .core import DataSource, load_renderer, run_audit
    from .fix import write_fixed
    from .review import read_review

    err = Console(stderr=True)
    # With --json -, stdout carries only the JSON document.
    console = console or (err if args.json == "-" else Console())
    if (msg := _validate(args)) is not None:
        return _fail(msg)
    cfg = None
    try:
        if args.config:
            cfg, _ = load_config(args.config, args.set or [])
        elif args.set:
            return _fail("--set needs --config")
        if args.data:
            data = [DataSource(p, "train", args.format) for p in args.data]
        elif cfg is not None:
            data = list(cfg.data.train)
        else:
            return _fail("give DATA files or --config with data.train")
        if args.eval:
            evals = [DataSource(p, "eval", args.format) for p in args.eval]
        elif cfg is not None and cfg.data.eval is not None:
            evals = [cfg.data.eval]
        else:
            evals = []
        opts = build_options(args, cfg)
        renderer, info = None, {"unit": "words", "note": "--no-tokenizer"}
        if not args.no_tokenizer:
            model = args.model or (cfg.model.name if cfg is not None else DEFAULT_MODEL)
            template = args.template or (cfg.template if cfg is not None else "auto")
            trust = cfg.model.trust_remote_code if cfg is not None else False
            train_on = args.train_on or (cfg.data.train_on if cfg is not None else DataConfig.train_on)
            with console.status(f"loading the tokenizer of {model}"):
                renderer, info = load_renderer(model, template, trust, train_on)
            if renderer is None:
                err.print(f"[yellow]tunelab audit: the tokenizer of {model} did not load ({info['error'][:300]}); "
                          "lengths are word counts[/yellow]")
        with console.status("auditing"):
            report = run_audit(data, evals, renderer=renderer, options=opts, tokenizer_info=info)
        if args.fix:
            review = read_review(args.apply_review, report.records) if args.apply_review else None
            fix = write_fixed(report, args.fix, args.balance, opts.seed, args.balance_ratio, review)
            report.sections["fix"] = fix.to_dict()
    except (ConfigError, DataError, FileExistsError) as e:
        return _fail(str(e))
    if args.json == "-":
        sys.stdout.write(report.to_json() + "\n")
    else:
        console.print(report.rich_summary() if args.quiet else report.rich_report())
        if args.json:
            report.write_json(args.json)
            console.print(f"JSON report written to {args.json}")
    if args.fix:
        for line in fix.lines():
            console.print(line, highlight=False, markup=False)
    return report.exit_code


def main(argv: Optional[list[str]] = None) -> int:
    """Run the audit without the rest of the tunelab CLI (``python -m tunelab.audit.cli``)."""
    p = argparse.ArgumentParser(prog="tunelab")
    sub = p.add_subparsers(dest="command", required=True)
    add_audit_parser(sub)
    args = p.parse_args(["audit", *(argv if argv is not None else sys.argv[1:])])
    return run_audit_command(args)


if __name__ == "__main__":
    sys.exit(main())
