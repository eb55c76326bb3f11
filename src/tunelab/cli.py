"""The ``tunelab`` command: one thin function per verb (parse, load config, call)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

from .audit.cli import add_audit_parser
from .config import ConfigError, describe, load_config


def _load(args: argparse.Namespace):
    return load_config(args.config, args.set or [])


def cmd_train(args: argparse.Namespace) -> int:
    from .train.recipe import train

    cfg, applied = _load(args)
    train(cfg, applied, resume=args.resume)
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
    from .data.render import Renderer
    from .models.load import load_tokenizer, resolve_model_path
    from .preview import preview

    cfg, _ = _load(args)
    tok = load_tokenizer(resolve_model_path(cfg.model.name), cfg.model.trust_remote_code)
    preview(cfg, Renderer.from_config(tok, cfg), args.n, args.json)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .models.merge import merge_run

    out = merge_run(args.run, args.out, args.dtype)
    print(f"merged model written to {out}")
    return 0


def _read_prompts(path: str) -> list[list[dict]]:
    from .data.formats import DataError, detect_format, read_records, to_conversation

    convs = []
    for rec in read_records(path):
        d = rec.data
        if isinstance(d, dict) and "prompt" in d and "completion" not in d:
            convs.append([{"role": "user", "content": str(d["prompt"])}])
            continue
        fmt = detect_format(set(d)) if isinstance(d, dict) else None
        if fmt is None:
            raise DataError(rec.where, f"expected {{prompt}} or a supported record format, keys seen: {sorted(d) if isinstance(d, dict) else d!r}")
        if fmt == "messages":
            msgs = [m for m in d["messages"]]
            while msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        else:
            conv = to_conversation(rec, fmt)
            convs.append([m for m in conv.messages[:-1]])
    return convs


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
    from .infer.generate import generate, load_for_inference

    loaded = load_for_inference(args.run, args.template)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("tunelab chat: empty line or Ctrl-D to quit, /reset to clear the history")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = generate(loaded, [history], args.max_new_tokens, args.temperature, args.top_p)[0]
        print(f"assistant> {reply}")
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_config_doc(args: argparse.Namespace) -> int:
    for key, default, doc in describe():
        print(f"{key:36} {default:24} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Supervised fine-tuning (LoRA, QLoRA, full) with correct defaults.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="YAML config")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")

    t = sub.add_parser("train", help="fine-tune per a config")
    with_config(t)
    t.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
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
    return p


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "peft", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    from .data.formats import DataError
    from .data.render import TemplateError

    try:
        return args.func(args) or 0
    except (ConfigError, DataError, TemplateError, FileNotFoundError, FileExistsError) as e:
        print(f"tunelab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
