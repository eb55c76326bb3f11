"""The ``doctor``, ``sweep`` and ``report`` verbs (argparse + the functions they run).

    tunelab doctor CONFIG [--strict] [--json]
    tunelab doctor [CONFIG] --advise [--model M] [--data D ...] [--memory 24GB] [--device cpu|cuda]
    tunelab sweep CONFIG --lr 1e-4,2e-4,4e-4 --rank 8,16,32 [--budget 0.25] [--then-train]
    tunelab report RUN_OR_SWEEP [--out report.html]

doctor exits 1 when --strict and an error finding exists, else 0; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import ConfigError, load_config


def add_plan_parsers(sub: Any) -> None:
    d = sub.add_parser("doctor", help="check a config against docs/practices.md; --advise: memory estimate and strategy advice")
    d.add_argument("config", nargs="?", help="YAML config (optional with --advise --model)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, as for tunelab train (repeatable)")
    d.add_argument("--strict", action="store_true", help="exit 1 when an error finding exists")
    d.add_argument("--json", action="store_true", help="print the findings (and advice) as JSON")
    d.add_argument("--advise", action="store_true", help="estimate memory by method and recommend a strategy")
    d.add_argument("--model", help="model: embedded alias, model dir, config.json, or cached hub id (default: the config's)")
    d.add_argument("--data", action="append", metavar="DATA", help="training data file (repeatable; default: the config's data.train)")
    d.add_argument("--memory", help="memory available, e.g. 24GB (default: this machine's GPU, else its available RAM)")
    d.add_argument("--device", choices=("cpu", "cuda"), help="where the run trains (default: cuda if available, else cpu)")
    d.set_defaults(func=cmd_doctor)

    s = sub.add_parser("sweep", help="short LR x rank trials on the same data order and eval set; picks a winner")
    s.add_argument("config", help="YAML config")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    s.add_argument("--lr", required=True, help="comma-separated learning rates, e.g. 1e-4,2e-4,4e-4")
    s.add_argument("--rank", default=None, help="comma-separated LoRA ranks, e.g. 8,16,32 (default: the config's)")
    s.add_argument("--budget", type=float, default=0.25, help="each trial's steps as a fraction of the full run's (default 0.25)")
    s.add_argument("--then-train", action="store_true", help="run the full training with the winner afterwards")
    s.add_argument("--out", help="sweep dir (default runs/<name>-sweep)")
    s.add_argument("--jobs", type=int, help="parallel trials (default: as many as cores and memory allow)")
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="write a run's or sweep's self-contained HTML report")
    r.add_argument("run", metavar="RUN_OR_SWEEP", help="run dir or sweep dir")
    r.add_argument("--out", help="output file (default RUN_OR_SWEEP/report.html)")
    r.set_defaults(func=cmd_report)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import ERROR, diagnose, format_report
    from .memory import parse_size

    try:
        memory = parse_size(args.memory) if args.memory else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out: dict = {}
    text: list[str] = []
    errors = 0
    cfg = None
    if args.config:
        cfg, _ = load_config(args.config, args.set or [])
        findings, ctx = diagnose(cfg, memory=memory, device=args.device)
        errors = sum(1 for f in findings if f.severity == ERROR)
        out["findings"] = [f.to_dict() for f in findings]
        text.append(format_report(findings, ctx))
    elif not args.advise:
        raise ConfigError("doctor: give CONFIG, or --advise --model M [--data D]")
    if args.advise:
        adv_text, adv = _advise(args, cfg, memory)
        out["advice"] = adv
        text.append(adv_text)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print("\n\n".join(text))
    return 1 if (args.strict and errors) else 0


def _advise(args: argparse.Namespace, cfg: Any, memory: Any) -> tuple[str, dict]:
    from ..audit import load_renderer
    from .advice import advise, format_advice
    from .facts import data_facts
    from .memory import ModelConfigError, available_memory, load_shape

    model = args.model or (cfg.model.name if cfg else None)
    if not model:
        raise ConfigError("doctor --advise: give --model (an embedded alias, a model dir or a config.json) or a CONFIG")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        shape = load_shape(model)
    except ModelConfigError as e:
        raise ConfigError(str(e)) from None
    mem = memory or available_memory(device)
    data = args.data or ([e.path for e in cfg.data.train] if cfg else [])
    facts = None
    if data:
        renderer, _ = load_renderer(model, cfg.template if cfg else "auto")
        facts = data_facts(data, [], renderer, cfg.data.max_seq_len if cfg else None)
    a = advise(shape, facts, mem, device, compute_bytes=4 if (cfg and cfg.model.dtype == "fp32") else 2)
    as_dict = {"method": a.method, "rank": a.rank, "targets": a.targets, "lr": a.lr, "epochs": a.epochs, "batch_size": a.batch_size,
               "grad_accum": a.grad_accum, "max_seq_len": a.max_seq_len, "max_tokens_per_pass": a.tokens_per_pass,
               "gradient_checkpointing": a.gradient_checkpointing, "retrieval": a.retrieval, "reasons": a.reasons,
               "memory": mem, "device": device, "estimates": {m: e.to_dict() for m, e in a.estimates.items()}}
    return format_advice(a, shape, mem, device), as_dict


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import parse_list, run_sweep

    cfg, applied = load_config(args.config, args.set or [])
    lrs = parse_list(args.lr, float, "--lr")
    ranks = parse_list(args.rank, int, "--rank") if args.rank else [cfg.lora.rank]
    _, winner, _ = run_sweep(cfg, lrs, ranks, args.budget, args.out, args.jobs, args.then_train, overrides=applied)
    return 0 if winner is not None else 1


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    print(f"report written to {write_report(args.run, args.out)}")
    return 0
