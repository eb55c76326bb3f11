"""The run's console, start and end: one compact header, and a final summary that says where
everything is and what to run next."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config
from ..data.truncation import TruncationSummary, summary_from_stats

DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Plan:
    """What the recipe derived from the config for this run."""

    total_steps: int
    steps_per_epoch: int
    eval_every: int
    save_every: int
    micro_per_step: int  # global micro-batches per optimizer step
    world: int
    fast_path: str


def truncation_summaries(cfg: Config, data: Any) -> list[tuple[str, TruncationSummary]]:
    out = [("train", summary_from_stats(data.train_stats, cfg.data.max_seq_len, cfg.data.truncation))]
    if data.eval_stats is not None:
        out.append(("eval", summary_from_stats(data.eval_stats, cfg.data.max_seq_len, cfg.data.truncation)))
    return out


def _files(cfg: Config, data: Any, split: str) -> str:
    entries = cfg.data.train if split == "train" else [cfg.data.eval] if cfg.data.eval is not None else []
    return ", ".join(f"{Path(e.path).name if e.path else e.source} ({data.formats.get(e.source, e.format)})" for e in entries)


def header_lines(cfg: Config, built: Any, data: Any, plan: Plan, overrides: list[str]) -> tuple[list[str], list[str]]:
    """(lines, warnings) of the run header: model, method, data, hyperparameters, overrides."""
    n_params = sum(p.numel() for p in built.model.parameters())
    arch = getattr(getattr(built.model, "config", None), "model_type", "?")
    base = {"full": "fp32 (full fine-tuning: fp32 master weights)", "qlora": "NF4 4-bit"}.get(cfg.method, DTYPE.get(built.compute_dtype, str(built.compute_dtype)))
    lines = [f"model     {cfg.model.name}  ({arch}, {n_params / 1e6:.1f}M params; frozen base {base}, compute {DTYPE.get(built.compute_dtype)}"
             f"{', model.dtype auto' if cfg.model.dtype == 'auto' else ''})"]
    if cfg.method in ("lora", "qlora"):
        lora = cfg.lora
        lines.append(f"method    {cfg.method}  rank {lora.rank}, alpha {cfg.lora_alpha:g}{' (2 x rank)' if lora.alpha is None else ''}, "
                     f"dropout {lora.dropout:g}, targets {lora.targets}, layers {lora.layers}")
    else:
        lines.append("method    full  (every weight trains)")
    ts, es = data.train_stats, data.eval_stats
    dropped = ts.total - ts.kept
    d = f"data      train {ts.kept} of {ts.total} records kept" + (f" ({dropped} dropped)" if dropped else "") + f" from {_files(cfg, data, 'train')}"
    lines.append(d)
    if es is not None:
        src = _files(cfg, data, "eval") if cfg.data.eval is not None else (f"{cfg.data.eval_fraction:g} of train, stratified" if cfg.data.eval_fraction is not None else "train (the default hold-out, stratified)")
        lines.append(f"          eval {es.kept} of {es.total} records kept from {src}")
    else:
        lines.append("          eval none (no early stopping; the final weights are the result)")
    warnings = []
    for what, s in truncation_summaries(cfg, data):
        if s.over:
            (warnings if s.warn else lines).append(s.line(what) if s.warn else "          " + s.line(what))
    lines.append(f"          max_seq_len {cfg.data.max_seq_len}, truncation {cfg.data.truncation}, train_on {cfg.data.train_on}, template {cfg.template}")
    if data.skipped:
        warnings.append(f"{len(data.skipped)} bad records skipped (data.on_error: skip), first: {'; '.join(map(str, data.skipped[:3]))}")
    t = cfg.train
    bs = t.batch_size * plan.micro_per_step
    epochs = plan.total_steps / max(plan.steps_per_epoch, 1)
    lines.append(f"train     lr {cfg.lr:g}{'' if t.lr is not None else ' (default)'}, {t.schedule}, warmup {t.warmup:g} "
                 f"({math.ceil(t.warmup * plan.total_steps)} steps); effective batch {bs} ({t.batch_size} x {t.grad_accum} accumulation x {plan.world} process(es))")
    stop = (f"early stopping on (patience {t.early_stopping.patience}), best adapter kept" if cfg.early_stopping_on
            else "early stopping off")
    lines.append(f"          {plan.total_steps} steps ({epochs:.2f} epochs of {plan.steps_per_epoch} steps); "
                 + (f"eval every {plan.eval_every} steps; {stop}" if es is not None else "no eval set"))
    lines.append(f"          fast path: {plan.fast_path}")
    if overrides:
        lines.append("overridden " + ", ".join(overrides))
    return lines, warnings


def summary_lines(cfg: Config, result: Any, artifacts: dict[str, Optional[Path]]) -> list[str]:
    """Where everything is and the next commands, for the end of the run."""
    run = cfg.run_dir
    lines = [f"done: {result.steps} steps in {_dur(result.train_seconds)} of training"
             + (f"; best eval loss {result.best_eval:.4f} at step {result.best_step}" if result.best_eval is not None else "")
             + ("; stopped early" if result.stopped_early else "")]
    for name, path in artifacts.items():
        if path is not None and Path(path).exists():
            lines.append(f"  {name:<12}{path}")
    lines += ["next:",
              f"  tunelab generate {run} --prompt \"...\"     # or --file prompts.jsonl",
              f"  tunelab chat {run}"]
    if cfg.method != "full":
        lines.append(f"  tunelab merge {run} --out {run}/merged    # base + adapter as one plain model")
    return lines


def _dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
