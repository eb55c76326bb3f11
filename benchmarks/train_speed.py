#!/usr/bin/env python
"""LoRA SFT speed and memory, tunelab vs TRL SFTTrainer + peft, side by side.

    python benchmarks/train_speed.py                 # both systems, 32 steps, 1 run each
    python benchmarks/train_speed.py --repeats 3     # min / median over 3 runs each
    python benchmarks/train_speed.py --systems tunelab --tunelab-set train.fused_decoder=false

Setup (the same for both systems): SmolLM2-135M-Instruct (the embedded model), LoRA r=16,
alpha=32, dropout 0.05 on q_proj/v_proj, micro-batch 8 (grad_accum 1), AdamW lr 2e-4 with
tunelab's cosine schedule (5% warmup), max grad norm 1, seed 42, loss on the completion only.
Data: alpaca_en_demo.json read from ../shared/data (never copied); the benchmark skips with a
message when it is absent. tunelab's seeded length-grouped sampler picks the batches, and TRL
gets *the same examples in the same batches in the same order* (``train_sampling_strategy=
"sequential"`` over a dataset laid out in that order), so per-step losses are comparable and
TRL gets the benefit of the length grouping too (this makes the speedup conservative).

TRL uses its prompt/completion format with ``completion_only_loss=True``: the prompt is the
chat template applied with the generation cue, the completion the answer plus ``<|im_end|>``
(the eos), exactly the span tunelab trains. The benchmark checks that both systems feed the
same token ids and train the same tokens (per step), and fails loudly otherwise.

Each system runs in its own subprocess (peak RSS = that process's ``ru_maxrss``), one after the
other, never concurrently. Precision: the benchmark measures fp32 and bf16 matmul peaks first and
runs each system in the faster one (``--precision`` overrides). MFU = model FLOPs / train time /
the measured matmul peak of the precision used, where model FLOPs count what the loss needs:
frozen linear layers 4 FLOPs/param/token (forward + input gradient: no weight gradient for a
frozen base), LoRA 6 FLOPs/param/token, causal attention scores, and lm_head only at trained
positions. The same FLOP count is used for both systems, so MFU ratios equal speed ratios.

The last line is ``speedup X.XXx memory Y.YYx loss_delta Z.Z% cpu KIND precision P`` (medians
over the runs; KIND is ``avx512_bf16``, ``amx`` or ``avx2`` (bf16 emulated), read from
/proc/cpuinfo, and P the precision both systems ran: ``auto`` takes the faster measured peak, so
fp32 where bf16 is emulated): speedup = tunelab tokens/s / TRL tokens/s; memory = tunelab peak RSS / TRL peak RSS (the
target is <= 0.5x);
loss_delta = (tunelab final loss - TRL final loss) / TRL final loss at the last step.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait (libgomp's default) collapse when other processes
# share the cores: measured here, 2 spinning threads ran 3-6x slower than 1 thread with one
# other busy process. Both systems get the same setting, passive unless the caller set one,
# before torch loads the OpenMP runtime (the workers inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
MODEL = "smollm2-135m-instruct"
IGNORE = -100


# --------------------------------------------------------------------------- configuration

def tunelab_config(args: argparse.Namespace, precision: str, output_dir: str) -> dict:
    """The tunelab config of the benchmark run (the plan and the worker use the same one)."""
    cfg = {
        "name": "bench",
        "output_dir": output_dir,
        "model": {"name": MODEL, "dtype": precision},
        "data": {"train": [{"path": str(DATA), "format": "alpaca"}], "audit": "off", "max_seq_len": args.max_seq_len,
                 "eval_fraction": 0},  # the whole file trains, as in the TRL run
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "targets": "qv"},
        "train": {"lr": args.lr, "max_steps": args.steps, "batch_size": args.batch, "grad_accum": 1, "warmup": 0.05,
                  "schedule": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": args.seed, "log_every": 1,
                  "save_every": args.steps, "keep_checkpoints": 1},
    }
    for item in args.tunelab_set:
        key, value = item.split("=", 1)
        node = cfg
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        import yaml

        node[last] = yaml.safe_load(value)
    return cfg


# --------------------------------------------------------------------------- hardware peak

def matmul_peak(dtype_name: str, budget_s: float = 3.0) -> float:
    """Best GFLOP/s of a square matmul in ``dtype_name``, sized so one product takes ~0.1-1 s."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = 256
    while True:  # grow the size until one product takes long enough to time well
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        t = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t
        if dt > 0.05 or n >= 2048:
            break
        n *= 2
    best = dt
    t_end = time.perf_counter() + budget_s
    reps = 0
    while time.perf_counter() < t_end or reps < 3:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2 * n**3 / best / 1e9


def cpu_kind() -> str:
    """``amx``, ``avx512_bf16`` (native bf16 matmuls) or the vector ISA torch uses (``avx2``...)."""
    import torch

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return torch.backends.cpu.get_cpu_capability().lower()


# --------------------------------------------------------------------------- model FLOPs

def linear_flops_per_token(config: dict, lora_rank: int = 16) -> float:
    """Decoder linear layers (frozen: 4 FLOPs/weight) plus q/v LoRA (trained: 6), per token."""
    h, L = config["hidden_size"], config["num_hidden_layers"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    linear = h * (nh * hd + 2 * nkv * hd) + nh * hd * h + 3 * h * config["intermediate_size"]
    lora = lora_rank * (h + nh * hd) + lora_rank * (h + nkv * hd)
    return L * (4 * linear + 6 * lora)


def model_flops(config: dict, lengths: list[int], trained: list[int], lora_rank: int = 16) -> float:
    """Training FLOPs the loss needs for examples of ``lengths`` with ``trained`` loss positions.

    Frozen base: forward 2 FLOPs per weight per token plus 2 for the input gradient (no weight
    gradient). LoRA A/B (trained): 6. Attention scores and values: causal, 2 matmuls of
    head_dim per (query, key) pair, times 3 for forward + backward. lm_head (tied to the frozen
    embedding): forward + input gradient at trained positions only.
    """
    h, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    inter = config["intermediate_size"]
    linear = h * (nh * hd + 2 * nkv * hd) + nh * hd * h + 3 * h * inter  # per layer
    lora = lora_rank * (h + nh * hd) + lora_rank * (h + nkv * hd)  # q and v adapters, per layer
    total = 0.0
    for n, t in zip(lengths, trained):
        pairs = n * (n + 1) / 2  # causal (query, key) pairs
        total += L * (4 * linear * n + 6 * lora * n + 3 * 2 * 2 * nh * hd * pairs)
        total += 4 * V * h * t
    return total


# --------------------------------------------------------------------------- the plan

def build_plan(args: argparse.Namespace, precisions: dict[str, str]) -> dict:
    """Examples in training order, as tunelab encodes them and as TRL gets them."""
    from tunelab.config import config_from_dict
    from tunelab.data.pipeline import prepare_data
    from tunelab.data.render import Renderer
    from tunelab.models.load import load_tokenizer, resolve_model_path
    from tunelab.data.batching import MicroBatchStream

    cfg = config_from_dict(tunelab_config(args, precisions.get("tunelab", "fp32"), "unused"))
    path = resolve_model_path(MODEL)
    tok = load_tokenizer(path)
    data = prepare_data(cfg, Renderer.from_config(tok, cfg))
    stream = MicroBatchStream([len(e) for e in data.train], cfg.train.batch_size, cfg.train.seed, cfg.train.length_grouping)
    steps = [list(stream[k]) for k in range(args.steps)]
    by_source = {c.source: c for c in data.train_conversations}
    rows, examples = [], []
    for batch in steps:
        for i in batch:
            ex = data.train[i]
            conv = by_source[ex.source]  # data.train holds the kept examples only: match by source, not index
            msgs = conv.messages
            if [m["role"] for m in msgs].count("assistant") != 1 or msgs[-1]["role"] != "assistant":
                raise SystemExit(f"{conv.source}: the benchmark expects single-turn examples")
            prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            rows.append({"prompt": prompt, "completion": msgs[-1]["content"] + tok.eos_token})
            examples.append({"input_ids": ex.input_ids, "labels": ex.labels, "source": conv.source})
    model_cfg = json.loads((Path(path) / "config.json").read_text())
    return {"model_path": path, "model_config": model_cfg, "steps": steps, "trl_rows": rows, "examples": examples,
            "batch": args.batch, "n_steps": args.steps, "lr": args.lr, "seed": args.seed, "warmup": 0.05,
            "max_seq_len": args.max_seq_len, "precisions": precisions, "trl_gradient_checkpointing": args.trl_gc}


# --------------------------------------------------------------------------- workers

def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_tunelab(args: argparse.Namespace, plan: dict) -> dict:
    import torch
    from rich.console import Console

    from tunelab.config import config_from_dict
    from tunelab.train.recipe import train

    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as out:
        cfg = config_from_dict(tunelab_config(args, plan["precisions"]["tunelab"], out))
        res = train(cfg, console=Console(file=io.StringIO(), width=200))
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    trained = [r["trained_tokens"] for r in rows if r.get("event") == "train"]
    per_step = [b - a for a, b in zip([0] + trained, trained)]
    return {"system": "tunelab", "precision": plan["precisions"]["tunelab"], "threads": torch.get_num_threads(),
            "train_seconds": res.train_seconds, "cpu_seconds": res.train_cpu_seconds, "fed_tokens": res.real_tokens, "trained_per_step": per_step,
            "losses": res.losses, "peak_rss": _peak_rss()}


def trl_loss_log_and_trainer(records: list[dict], n_steps: int, warmup: int) -> tuple[type, type]:
    """A TRL callback that appends each logged loss to ``records``, and an SFTTrainer that runs
    tunelab's warmup + cosine schedule exactly (shared by the CPU and GPU benchmarks)."""
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from tunelab.train.schedule import lr_factor

    class Logs(TrainerCallback):
        def on_log(self, args_, state, control, logs=None, **k):
            if logs and "loss" in logs:
                records.append({"step": state.global_step, **logs})

    class Trainer(SFTTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):  # tunelab's schedule, exactly
            if self.lr_scheduler is None:
                opt = optimizer or self.optimizer
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, n_steps, warmup, "cosine", 0.0))
            return self.lr_scheduler

    return Logs, Trainer


def worker_trl(args: argparse.Namespace, plan: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig


    prec = plan["precisions"]["trl"]
    n_steps, warmup = plan["n_steps"], math.ceil(plan["warmup"] * plan["n_steps"])
    marks: dict[str, float] = {}
    logs: list[dict] = []

    class Probe(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["begin"], marks["cpu_begin"] = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            marks["end"], marks["cpu_end"] = time.perf_counter(), time.process_time()

    Logs, Trainer = trl_loss_log_and_trainer(logs, n_steps, warmup)

    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        config = SFTConfig(
            output_dir=out, max_steps=n_steps, per_device_train_batch_size=plan["batch"], gradient_accumulation_steps=1,
            learning_rate=plan["lr"], weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", lr_scheduler_type="cosine",
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=plan["seed"], data_seed=plan["seed"],
            bf16=prec == "bf16", fp16=False, use_cpu=True, completion_only_loss=True, max_length=plan["max_seq_len"],
            train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False,
            gradient_checkpointing=plan["trl_gradient_checkpointing"],
            model_init_kwargs={"dtype": dtype, "attn_implementation": "sdpa"},
        )
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM")
        trainer = Trainer(model=plan["model_path"], args=config, train_dataset=Dataset.from_list(plan["trl_rows"]),
                          peft_config=lora, callbacks=[Probe(), Logs()])
        ds = trainer.train_dataset
        ids, labels = [list(x) for x in ds["input_ids"]], [list(x) for x in ds["labels"]]
        trainer.train()
    losses = [float(x["loss"]) for x in sorted(logs, key=lambda r: r["step"])]
    b = plan["batch"]
    trained = [sum(1 for x in lab[1:] if x != IGNORE) for lab in labels]
    return {"system": "trl", "precision": prec, "threads": torch.get_num_threads(),
            "train_seconds": marks["end"] - marks["begin"], "cpu_seconds": marks["cpu_end"] - marks["cpu_begin"],
            "fed_tokens": sum(len(x) for x in ids),
            "trained_per_step": [sum(trained[i:i + b]) for i in range(0, len(trained), b)],
            "losses": losses, "peak_rss": _peak_rss(), "input_ids": ids, "labels": labels}


# --------------------------------------------------------------------------- profile

PROFILE_GROUPS = {  # self time of aten ops, by kind
    "matmul (mm/addmm)": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention (flash kernels)": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "softmax / log-softmax": ("aten::_log_softmax", "aten::_softmax", "aten::exp_", "aten::exp", "aten::_log_softmax_backward_data"),
    "dropout RNG + masks": ("aten::random_", "aten::bernoulli_", "aten::ge", "aten::where"),
}


def profile_tunelab(args: argparse.Namespace, plan: dict, steps: int) -> None:
    """Profile tunelab's inner loop (as the recipe runs it) on the benchmark's first batches."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tunelab.config import config_from_dict
    from tunelab.data.batching import collate, split_by_tokens
    from tunelab.data.render import EncodedExample
    from tunelab.models.build import build_model
    from tunelab.train.loss import CausalLMLoss

    cfg = config_from_dict(tunelab_config(args, plan["precisions"]["tunelab"], "unused"))
    torch.manual_seed(0)
    built = build_model(cfg, torch.device("cpu"))
    loss_fn = CausalLMLoss(built.model, cfg.train.trained_logits_only, cfg.train.fused_decoder, cfg.train.shared_prefix,
                           compile_pointwise=cfg.train.compile_pointwise).train()
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan["lr"])
    exs = [EncodedExample(e["input_ids"], e["labels"]) for e in plan["examples"]]
    b = plan["batch"]

    def step(k: int) -> int:
        parts = [collate(p, built.tokenizer.pad_token_id) for p in split_by_tokens(exs[k * b:(k + 1) * b], cfg.train.max_tokens_per_pass)]
        n = sum(x.n_trained for x in parts)
        for x in parts:
            loss, _ = loss_fn(x.input_ids, x.attention_mask, x.labels)
            (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(x.n_real for x in parts)

    step(0)  # warm-up
    t = time.perf_counter()
    tokens = sum(step(k) for k in range(1, 1 + steps))
    plain = time.perf_counter() - t
    print(f"\nwithout the profiler: {steps} steps, {tokens} tokens, {plain:.1f} s, {tokens / plain:.1f} tokens/s "
          f"(optimizer steps continue from there: the profiled steps see the same batches)")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        tokens = sum(step(k) for k in range(1, 1 + steps))
        wall = time.perf_counter() - t
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile: tunelab, {steps} steps, {tokens} tokens, {wall:.1f} s under the profiler; fused decoder: {loss_fn.fused_reason}")
    print("  by kernel (self CPU time):")
    seen = set()
    for group, names in PROFILE_GROUPS.items():
        t_g = sum(e.self_cpu_time_total for e in events if e.key in names)
        seen.update(names)
        print(f"    {group:<30} {t_g / total:6.1%}")
    rest = sorted(((e.self_cpu_time_total, e.key) for e in events if e.key not in seen), reverse=True)
    print(f"    {'everything else':<30} {sum(x for x, _ in rest) / total:6.1%}   (top: "
          + ", ".join(f"{k} {x / total:.1%}" for x, k in rest[:6]) + ")")
    print("  by stage (inclusive CPU time; forward and backward of the custom autograd functions):")
    stage = {e.key: e.cpu_time_total for e in events}
    for key, label in (("_AttnBlock", "attention block forward (norm, qkv, RoPE, flash, o_proj)"),
                       ("_AttnBlockBackward", "attention block backward"),
                       ("_MlpBlock", "MLP block forward (norm, gate/up, SiLU, down)"),
                       ("_MlpBlockBackward", "MLP block backward"),
                       ("LinearCrossEntropy", "lm_head + cross-entropy, trained rows (fwd + its bwd matmul)"),
                       ("Optimizer.step#AdamW.step", "AdamW step")):
        if key in stage:
            print(f"    {label:<62} {stage[key] / total:6.1%}")
    rows = []  # matmuls by shape: which products take the time, and how close to the peak they run
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = [s for s in (e.input_shapes or []) if s]
        if e.key not in ("aten::mm", "aten::addmm", "aten::addmm_") or len(shapes) < 2:
            continue
        a, b = (shapes[0], shapes[1]) if e.key == "aten::mm" else (shapes[-2], shapes[-1])
        if len(a) == 2 and len(b) == 2 and e.self_cpu_time_total > 0:
            rows.append((e.self_cpu_time_total, e.key, a, b, e.count, 2 * a[0] * a[1] * b[1] * e.count))
    mm_us, mm_flop = sum(r[0] for r in rows), sum(r[5] for r in rows)
    print(f"  matmuls: {mm_us / 1e6:.1f} s at {mm_flop / max(mm_us, 1) / 1e3:.1f} GFLOP/s overall; the costliest shapes (calls, s, GFLOP/s):")
    for us, key, a, b, count, flop in sorted(rows, key=lambda r: -r[0])[:8]:
        print(f"    {key:<13} {str(a):>14} @ {str(b):<14} {count:5d} {us / 1e6:6.2f} {flop / us / 1e3:6.1f}")


# --------------------------------------------------------------------------- checks and report

def shared_prefix_tokens(args: argparse.Namespace, plan: dict) -> int:
    """Token rows tunelab's shared-prefix packing leaves out, replaying its passes exactly."""
    from tunelab.config import config_from_dict
    from tunelab.data.batching import collate, split_by_tokens
    from tunelab.data.render import EncodedExample
    from tunelab.train.loss import pack

    cfg = config_from_dict(tunelab_config(args, "fp32", "unused"))
    if not (cfg.train.fused_decoder and cfg.train.shared_prefix and cfg.train.trained_logits_only):
        return 0
    exs = [EncodedExample(e["input_ids"], e["labels"]) for e in plan["examples"]]
    b, skipped = plan["batch"], 0
    for k in range(0, len(exs), b):
        for part in split_by_tokens(exs[k:k + b], cfg.train.max_tokens_per_pass):
            x = collate(part, 0)
            packed = pack(x.input_ids, x.attention_mask, x.labels, True)
            skipped += (len(part) - 1) * packed.shared_prefix
    return skipped


def check_same_tokens(plan: dict, trl: dict) -> tuple[int, int]:
    """TRL's tokens and labels must be tunelab's (tunelab may keep a trailing untrained token).
    Returns (common real tokens, common trained tokens)."""
    real = trained = 0
    for k, (ex, ids, lab) in enumerate(zip(plan["examples"], trl["input_ids"], trl["labels"])):
        n = len(ids)
        if ex["input_ids"][:n] != list(ids) or any(x != IGNORE for x in ex["labels"][n:]):
            first = next((j for j, (a, b) in enumerate(zip(ex["input_ids"], ids)) if a != b), min(n, len(ex["input_ids"])))
            raise SystemExit(f"token mismatch at example {k} ({ex['source']}) at token {first}: tunelab {ex['input_ids'][first:first + 4]} vs TRL {list(ids)[first:first + 4]} (lengths {len(ex['input_ids'])}, {n})")
        # TRL labels every completion token; token 0 is never a target, so compare from 1 on.
        if ex["labels"][1:n] != list(lab)[1:n]:
            raise SystemExit(f"label mismatch at example {k} ({ex['source']}): the systems train different tokens")
        real += n
        trained += sum(1 for x in lab[1:] if x != IGNORE)
    return real, trained


def summarize(values: list[float]) -> str:
    return f"min {min(values):.2f} median {statistics.median(values):.2f} max {max(values):.2f}"


def run_worker(system: str, plan_path: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
        out_path = fh.name
    cmd = [sys.executable, __file__, "--worker", system, "--plan", plan_path, "--out", out_path] + argv
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
        raise SystemExit(f"{system} worker failed (exit {proc.returncode})")
    res = json.loads(Path(out_path).read_text())
    os.unlink(out_path)
    res["process_seconds"] = time.perf_counter() - t
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--systems", nargs="+", default=["tunelab", "trl"], choices=["tunelab", "trl"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: each system runs in the precision whose measured matmul peak is higher")
    ap.add_argument("--trl-gc", type=lambda s: s.lower() in ("1", "true", "yes", "on"), default=True,
                    help="TRL gradient checkpointing (TRL's SFTConfig default: true)")
    ap.add_argument("--tunelab-set", action="append", default=[], metavar="KEY=VALUE", help="tunelab config override, e.g. train.packing=false")
    ap.add_argument("--threads", type=int, help="torch threads in both workers (default: torch's default, the core count)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS", help="only profile tunelab's step on the first STEPS batches (after 1 warm-up)")
    ap.add_argument("--json", help="also write all results here")
    ap.add_argument("--worker", choices=["tunelab", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        plan = json.loads(Path(args.plan).read_text())
        res = (worker_tunelab if args.worker == "tunelab" else worker_trl)(args, plan)
        Path(args.out).write_text(json.dumps(res))
        return 0

    if not DATA.exists():
        print(f"skip: {DATA} is absent (the benchmark reads alpaca_en_demo.json from ../shared/data)")
        return 0
    if "trl" in args.systems:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("skip TRL: it is not installed; install the bench extra: pip install -e '.[bench]'")
            args.systems = [s for s in args.systems if s != "trl"]
    import torch

    peaks = {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16", budget_s=1.0)}
    fastest = max(peaks, key=peaks.get)
    precision = fastest if args.precision == "auto" else args.precision
    precisions = {s: precision for s in ("tunelab", "trl")}
    print(f"cpu {cpu_kind()} (torch capability {torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), load average {os.getloadavg()[0]:.1f}; matmul peak "
          f"fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s -> {precision}"
          + (" (bf16 is emulated here: no avx512_bf16/AMX)" if peaks["bf16"] < peaks["fp32"] else ""), flush=True)

    plan = build_plan(args, precisions)
    if args.profile:
        profile_tunelab(args, plan, args.profile)
        return 0
    fd, plan_path = tempfile.mkstemp(suffix=".json", prefix="bench-plan-")
    with os.fdopen(fd, "w") as fh:
        json.dump(plan, fh)
    worker_argv = ["--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr), "--seed", str(args.seed),
                   "--max-seq-len", str(args.max_seq_len)] + (["--threads", str(args.threads)] if args.threads else []) + [x for s in args.tunelab_set for x in ("--tunelab-set", s)]
    lengths = [len(e["input_ids"]) for e in plan["examples"]]
    print(f"data: {len(plan['examples'])} examples in {args.steps} steps of {args.batch} from {DATA.name}; "
          f"{sum(lengths)} tunelab tokens", flush=True)

    results: dict[str, list[dict]] = {s: [] for s in args.systems}
    try:
        for r in range(args.repeats):
            for s in (args.systems if r % 2 == 0 else args.systems[::-1]):  # alternate the order: drift hits both
                res = run_worker(s, plan_path, worker_argv)
                results[s].append(res)
                print(f"  run {r + 1} {s}: {res['train_seconds']:.1f} s train ({res['cpu_seconds']:.1f} CPU s), {res['fed_tokens']} tokens fed, "
                      f"peak RSS {res['peak_rss'] / 2**30:.2f} GiB, final loss {res['losses'][-1]:.4f}", flush=True)
    finally:
        os.unlink(plan_path)

    # Same tokens: TRL's token ids and labels against tunelab's encoding, and per-step trained counts.
    if "trl" in results:
        real, trained = check_same_tokens(plan, results["trl"][0])
    else:
        ex = plan["examples"]
        last = [max((j for j, x in enumerate(e["labels"]) if x != IGNORE), default=0) + 1 for e in ex]
        real, trained = sum(last), sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in ex)
    for s, runs in results.items():
        for res in runs:
            if sum(res["trained_per_step"]) != trained or len(res["trained_per_step"]) != args.steps:
                raise SystemExit(f"{s} trained {sum(res['trained_per_step'])} tokens in {len(res['trained_per_step'])} steps, expected {trained} in {args.steps}")
    if "trl" in results and "tunelab" in results:
        if results["trl"][0]["trained_per_step"] != results["tunelab"][0]["trained_per_step"]:
            raise SystemExit("the systems train different tokens per step")
    print(f"check: both systems feed the same {real} tokens and train the same {trained} completion tokens "
          f"({trained / real:.1%}), step by step")

    trained_lengths = [sum(1 for x in e["labels"][1:] if x != IGNORE) for e in plan["examples"]]
    common_lengths = [len(x) for x in results["trl"][0]["input_ids"]] if "trl" in results else \
        [max((j for j, x in enumerate(e["labels"]) if x != IGNORE), default=0) + 1 for e in plan["examples"]]
    flops = model_flops(plan["model_config"], common_lengths, trained_lengths)
    skipped = shared_prefix_tokens(args, plan) if "tunelab" in results else 0
    executed = flops - skipped * linear_flops_per_token(plan["model_config"])
    print(f"model FLOPs: {flops / 1e12:.2f} TFLOP for the run, {flops / real / 1e6:.0f} MFLOP per token"
          + (f"; tunelab computes a shared prompt prefix once per pass, skipping {skipped} token rows "
             f"({1 - executed / flops:.1%} of the FLOPs)" if skipped else ""))

    table = {}
    print(f"\n{'system':<8} {'prec':<5} {'tokens/s (min/median/max)':<28} {'tokens/CPU-s':<13} {'peak RSS GiB (min/median)':<26} {'final loss':<11} {'MFU median':<10}")
    for s, runs in results.items():
        tps = [real / r["train_seconds"] for r in runs]
        rss = [r["peak_rss"] / 2**30 for r in runs]
        loss = [r["losses"][-1] for r in runs]
        prec = runs[0]["precision"]
        mfu = [flops / r["train_seconds"] / (peaks[prec] * 1e9) for r in runs]
        hfu = [(executed if s == "tunelab" else flops) / r["train_seconds"] / (peaks[prec] * 1e9) for r in runs]
        cpu = [real / r["cpu_seconds"] for r in runs]
        table[s] = {"tps": statistics.median(tps), "rss": statistics.median(rss), "loss": statistics.median(loss),
                    "mfu": statistics.median(mfu), "hfu": statistics.median(hfu), "tps_all": tps, "rss_all": rss, "loss_all": loss,
                    "mfu_all": mfu, "tokens_per_cpu_s": statistics.median(cpu)}
        print(f"{s:<8} {prec:<5} {min(tps):7.1f} / {statistics.median(tps):7.1f} / {max(tps):7.1f}     {statistics.median(cpu):7.1f}       "
              f"{min(rss):5.2f} / {statistics.median(rss):5.2f}              {statistics.median(loss):<11.4f} {statistics.median(mfu):6.1%}"
              + (f" (executed FLOPs: {statistics.median(hfu):.1%})" if s == "tunelab" and skipped else ""))
    if args.repeats > 1:
        for s in results:
            print(f"  {s} tokens/s over {args.repeats} runs: {summarize(table[s]['tps_all'])}; spread "
                  f"{(max(table[s]['tps_all']) - min(table[s]['tps_all'])) / statistics.median(table[s]['tps_all']):.0%} of the median")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "flops": flops, "real_tokens": real, "trained_tokens": trained,
                                               "results": {s: [{k: v for k, v in r.items() if k not in ("input_ids", "labels")} for r in runs]
                                                           for s, runs in results.items()}, "table": table}, indent=1))
    if "trl" in table and "tunelab" in table:
        a, b = results["tunelab"][0]["losses"], results["trl"][0]["losses"]
        worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
        print(f"per-step loss: largest relative difference {worst:.2%} over {len(a)} steps (run 1)")
        speed = table["tunelab"]["tps"] / table["trl"]["tps"]
        memory = table["tunelab"]["rss"] / table["trl"]["rss"]
        delta = (table["tunelab"]["loss"] - table["trl"]["loss"]) / table["trl"]["loss"] * 100
        print(f"speedup {speed:.2f}x memory {memory:.2f}x loss_delta {delta:.1f}% cpu {cpu_kind()} precision {precision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
