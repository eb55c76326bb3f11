"""The ``tunelab`` command: one thin function per verb (parse, load config, call)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

from .audit.cli import add_audit_parser
from .config import ConfigError, describe_full, load_config
from .plan.cli import add_plan_parsers


def _load(args: argparse.Namespace):
    return load_config(args.config, (args.set or []) + (["model.allow_pickle=true"] if getattr(args, "allow_pickle", False) else []))


def cmd_train(args: argparse.Namespace) -> int:
    cfg, applied = _load(args)  # config errors first, before the heavy imports
    from .plan.run import train_checked  # the doctor, the recipe, the HTML report
    from .train.guards import Interrupted, TrainingStopped

    try:
        train_checked(cfg, applied, resume=args.resume, strict=args.strict, overwrite=args.overwrite)
    except Interrupted as e:
        again = " ".join(["tunelab train", args.config, *[f"--set {s}" for s in args.set or []], "--resume"])
        print(f"tunelab: {e}; resume with: {again}", file=sys.stderr)
        return e.exit_code
    except TrainingStopped as e:
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print(f"tunelab: error: {e}", file=sys.stderr)
        return e.exit_code
    if cfg.eval.retention and int(os.environ.get("RANK", "0")) == 0:
        from .evaluate.command import retention_after_training

        retention_after_training(cfg)  # eval.retention: forgetting, base vs tuned, into the run dir
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate.command import run_eval

    run_eval(args)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .evaluate.diagnose import diagnose_run

    diagnose_run(args.run)
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    cfg, _ = _load(args)  # config errors first, before the heavy imports
    from .data.render import Renderer
    from .models.load import load_tokenizer, resolve_model_path
    from .preview import preview

    tok = load_tokenizer(resolve_model_path(cfg.model.name), cfg.model.trust_remote_code)
    preview(cfg, Renderer.from_config(tok, cfg), args.n, args.json)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .models.merge import merge_run

    out = merge_run(args.run, args.out, args.dtype)
    print(f"merged model written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .models.export_gguf import export_run
    from .train.reporting import format_bytes

    info = export_run(args.run, args.gguf, args.type)
    types = ", ".join(f"{n} {t}" for t, n in sorted(info.types.items()))
    print(f"GGUF written to {info.path}: {info.arch}, {info.qtype}, {info.n_tensors} tensors ({types}), {format_bytes(info.bytes)}")
    for note in info.notes:
        print(f"note: {note}")
    return 0


def _read_prompts(path: str) -> list[list[dict]]:
    from .data.formats import read_prompts

    return read_prompts(path)


def cmd_generate(args: argparse.Namespace) -> int:
    from .infer.generate import generate, load_for_inference

    if not args.prompt and not args.file:
        raise ConfigError("generate: give --prompt TEXT or --file prompts.jsonl")
    loaded = load_for_inference(args.run, args.template)
    convs = []
    if args.prompt:
        convs += [[*([{"role": "system", "content": args.system}] if args.system else []), {"role": "user", "content": p}] for p in args.prompt]
    if args.file:
        convs += _read_prompts(args.file)
    outs = generate(loaded, convs, args.max_new_tokens, args.temperature, args.top_p)
    for conv, out in zip(convs, outs):
        if args.json:
            print(json.dumps({"prompt": conv[-1]["content"], "completion": out}, ensure_ascii=False))
        else:
            print(f">>> {conv[-1]['content']}\n{out}\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .infer.chat import run_chat
    from .infer.generate import load_for_inference

    run_chat(load_for_inference(args.run, args.template), args.system, args.max_new_tokens, args.temperature, args.top_p)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.server import serve

    serve(args.run, args.host, args.port, args.template, args.model_name, args.max_queue, args.max_tokens_limit)
    return 0


def cmd_self_instruct(args: argparse.Namespace) -> int:
    from .datagen.cli import run_self_instruct

    return run_self_instruct(args)


def cmd_augment(args: argparse.Namespace) -> int:
    from .datagen.cli import run_augment

    return run_augment(args)


def cmd_config_doc(args: argparse.Namespace) -> int:
    print(f"{'key':36} {'default':24} meaning\n{'':61}allowed values")
    for key, default, doc, allowed in describe_full():
        print(f"{key:36} {default:24} {doc}")
        if allowed:
            print(f"{'':61}allowed: {allowed}")
    print("A dataset entry (data.train[], data.eval) may also be written as a bare path: data.train: [a.jsonl, b.csv].")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Supervised fine-tuning (LoRA, QLoRA, full) with correct defaults.")
    p.add_argument("--version", action="version", version=f"tunelab {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="YAML config")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
        sp.add_argument("--allow-pickle", action="store_true", help="allow weights/checkpoints that only pickle can read (runs code from the file)")

    t = sub.add_parser("train", help="fine-tune per a config")
    with_config(t)
    t.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a run dir that holds a run (the old run is moved to <dir>.bak-<time>)")
    t.add_argument("--strict", action="store_true", help="refuse to train on a doctor error finding (doctor.strict: true)")
    t.set_defaults(func=cmd_train)

    pv = sub.add_parser("preview", help="show rendered training examples with the trained tokens highlighted")
    with_config(pv)
    pv.add_argument("-n", type=int, default=3, help="examples to show")
    pv.add_argument("--json", action="store_true", help="one JSON object per example: segments, n_tokens, n_trained")
    pv.set_defaults(func=cmd_preview)

    m = sub.add_parser("merge", help="merge a run's adapter into its base model")
    m.add_argument("run", help="run dir (runs/NAME)")
    m.add_argument("--out", required=True, help="new output dir")
    m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="dtype of the merged weights (default: the base's)")
    m.set_defaults(func=cmd_merge)

    ex = sub.add_parser("export", help="export a run (adapter merged) as GGUF for llama.cpp / Ollama")
    ex.add_argument("run", help="run dir (runs/NAME), or a merged model dir")
    ex.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write (must not exist)")
    ex.add_argument("--type", choices=["f16", "q8_0"], default="f16", help="tensor type of the matrices (default f16; norms stay f32)")
    ex.set_defaults(func=cmd_export)

    for name, fn, hlp in (("generate", cmd_generate, "complete prompts with the training template"), ("chat", cmd_chat, "chat with the training template")):
        g = sub.add_parser(name, help=hlp)
        g.add_argument("run", help="run dir, model dir, hub id, .gguf, or smollm2-135m-instruct")
        if name == "generate":
            g.add_argument("--prompt", action="append", help="a user message (repeatable)")
            g.add_argument("--file", help="prompts: .jsonl/.json/.csv/.parquet with {prompt} or any supported format")
            g.add_argument("--json", action="store_true", help="print JSON lines")
        g.add_argument("--system", help="system message")
        g.add_argument("--template", help="override the template (default: the run's)")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        g.add_argument("--top-p", type=float, default=1.0)
        g.set_defaults(func=fn)

    sv = sub.add_parser("serve", help="serve a run or model over an OpenAI-compatible API (/v1/chat/completions)")
    sv.add_argument("run", help="run dir, model dir, hub id, .gguf, or smollm2-135m-instruct")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    sv.add_argument("--template", help="override the template (default: the run's)")
    sv.add_argument("--model-name", help="the model id clients send (default: the run dir's name)")
    sv.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429 (default 16)")
    sv.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    sv.set_defaults(func=cmd_serve)

    from .datagen.cli import add_augment_parser, add_self_instruct_parser

    add_self_instruct_parser(sub, cmd_self_instruct)
    add_augment_parser(sub, cmd_augment)

    ev = sub.add_parser("eval", help="exact match, BLEU, ROUGE-L, loss: train vs held-out, paraphrase gap, forgetting")
    ev.add_argument("run", help="run dir (runs/NAME), or a model with --data")
    ev.add_argument("--data", help="evaluate on this file instead of the run's train sample and held-out set")
    ev.add_argument("--metrics", default="em,bleu,rougeL,loss", help="comma-separated: em,bleu,rougeL,loss (default: all)")
    ev.add_argument("--max", type=int, default=200, help="prompts per side at most (seeded sample; default 200)")
    ev.add_argument("--json", help="write every number and every prediction to this JSON file")
    ev.add_argument("--paraphrases", action="append", metavar="FILE", help="the run's training records phrased differently, in the same order: the memorization gap (repeatable)")
    ev.add_argument("--retention", metavar="FILE", help="general text or instruction data: forgetting, base vs tuned")
    ev.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.set_defaults(func=cmd_eval)

    dg = sub.add_parser("diagnose", help="a run's findings (overfitting, memorizing, spikes, ...) and its loss curves")
    dg.add_argument("run", help="run dir (runs/NAME)")
    dg.set_defaults(func=cmd_diagnose)

    cd = sub.add_parser("config-doc", help="list every config key with its default and meaning")
    cd.set_defaults(func=cmd_config_doc)

    add_audit_parser(sub)
    add_plan_parsers(sub)
    for parser in (p, *sub.choices.values()):  # before or after the verb
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="show the libraries' progress bars and warnings")
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tunelab")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _ordinary_errors() -> tuple[type, ...]:
    """The exceptions that are a user's mistake: one line, exit 2, no traceback."""
    from .data.formats import DataError
    from .data.render import TemplateError
    from .models.load import ModelError
    from .models.quantize import QuantizationBackendError
    from .train.checkpoint import PickleRefused

    return (ConfigError, DataError, TemplateError, ModelError, QuantizationBackendError, PickleRefused, FileNotFoundError, FileExistsError)


def main(argv: Optional[list[str]] = None) -> int:
    """Run a verb. Ordinary mistakes: ``tunelab: error: ...`` on stderr, exit 2 (``--debug``:
    with the traceback); Ctrl-C: one line, exit 130."""
    import traceback

    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = getattr(args, "debug", False)
        from .console import quiet_libraries

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        quiet_libraries(verbose=getattr(args, "verbose", False))
        try:
            return args.func(args) or 0
        except _ordinary_errors() as e:
            if debug:
                traceback.print_exc()
            print(f"tunelab: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("\ntunelab: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
