"""The training run, top to bottom: setup, loop, eval, save.

This is the file to read first. It runs under accelerate: ``python -m tunelab train`` is one
process; ``accelerate launch -m tunelab train`` gives DDP (or FSDP) without another code path.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console

from ..audit import audit_for_training
from ..config import Config, dump_yaml
from ..data.batching import MicroBatchStream, collate, split_by_tokens
from ..data.pipeline import prepare_data
from ..data.replay import replay_share
from ..data.render import Renderer
from ..files import atomic_write_text
from ..models.build import build_model
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_trained
from .diagnosis import Diagnoser, RunContext
from .distributed import equalize_passes, full_optimizer_state, full_trainable_state, is_fsdp, load_optimizer_state, make_accelerator, run_once
from .evaluate import autocast_for, loss_sums
from .loss import CausalLMLoss
from .memory import memory_report
from .quantization_cost import report_quantization_cost
from .reporting import format_bytes, make_reporter, peak_memory_bytes
from .schedule import make_scheduler


@dataclass
class LoopState:
    """Everything besides weights/optimizer that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches consumed from the (multi-epoch) stream
    trained_tokens: int = 0
    best_eval: float = math.inf
    best_step: Optional[int] = None
    bad_evals: int = 0


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_eval: Optional[float]
    best_step: Optional[int]
    stopped_early: bool
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0  # wall time of the training steps (no eval, no setup)
    train_cpu_seconds: float = 0.0  # CPU time of this process over the same span (all threads)
    real_tokens: int = 0  # non-pad tokens fed to the model over the run
    replay_share: Optional[float] = None  # share of the trained tokens that were replay (data.replay)
    findings: list = field(default_factory=list)  # diagnosis findings (train/diagnosis.py)


def train(cfg: Config, overrides: tuple[str, ...] | list[str] = (), resume: bool = False, stop_at_step: Optional[int] = None, console: Optional[Console] = None) -> TrainResult:
    """Fine-tune per ``cfg``. ``stop_at_step`` ends the run early as an interruption would
    (used by the resume tests); everything else comes from the config."""
    from accelerate.utils import set_seed

    # ---------------------------------------------------------------- setup
    accelerator = make_accelerator()  # one process, or DDP / FSDP under accelerate launch
    device = accelerator.device
    run_dir = cfg.run_dir
    ckpt = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    resume_step = int(ckpt.name.split("-")[1]) if ckpt else None
    rep = make_reporter(accelerator.is_main_process, run_dir, console, resume_step)
    rep.info(f"[bold]tunelab train[/bold] {cfg.name} -> {run_dir}  ({accelerator.num_processes} process(es) on {device})")
    if overrides:
        rep.info("overridden: " + ", ".join(overrides))
    rep.info(dump_yaml(cfg).rstrip())
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    set_seed(cfg.train.seed)

    built = build_model(cfg, device)
    model, tokenizer = built.model, built.tokenizer
    renderer = Renderer.from_config(tokenizer, cfg)
    data = prepare_data(cfg, renderer)
    rep.info(f"data: {data.formats}; train {data.train_stats.summary()}" + (f"; eval {data.eval_stats.summary()}" if data.eval_stats else ""))
    rep.info(data.eval_note)
    if data.replay is not None and cfg.data.audit == "off":
        rep.info(data.replay.summary())  # else the audit summary shows it
    if data.skipped:
        rep.warn(f"{len(data.skipped)} bad records skipped (data.on_error: skip), first: {data.skipped[:3]}")
    run_once(accelerator, lambda: audit_for_training(cfg, renderer, data, rep))  # data.audit: off | warn | strict (strict raises)
    rep.table("parameters", *memory_report(model))
    if cfg.method == "qlora" and data.eval and ckpt is None:
        # What NF4 costs: the base's eval loss quantized vs unquantized (loads the latter briefly).
        if accelerator.is_main_process:
            report_quantization_cost(cfg, model, data.eval, device, tokenizer.pad_token_id or 0, rep.info, rep.warn, run_dir)
        accelerator.wait_for_everyone()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.train.weight_decay, betas=(0.9, 0.999))
    stream = MicroBatchStream([len(e) for e in data.train], cfg.train.batch_size, cfg.train.seed, cfg.train.length_grouping)
    ga, world, rank = cfg.train.grad_accum, accelerator.num_processes, accelerator.process_index
    micro_per_step = ga * world  # global micro-batches per optimizer step: the global batch is batch_size x this
    steps_per_epoch = math.ceil(stream.per_epoch / micro_per_step)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * stream.per_epoch / micro_per_step))
    scheduler = make_scheduler(optimizer, total_steps, cfg.train.warmup, cfg.train.schedule, cfg.train.min_lr_ratio)
    eval_every = cfg.train.eval_every or max(1, total_steps // 10)
    save_every = cfg.train.save_every or eval_every
    diag = Diagnoser(RunContext(total_steps, len(data.train), cfg.train.warmup, cfg.train.schedule, cfg.train.min_lr_ratio,
                                cfg.train.early_stopping.patience))
    if ckpt is None:
        rep.metrics(event="run", step=0, total_steps=total_steps, n_train=len(data.train), n_eval=len(data.eval))
    for f in diag.start():
        rep.finding(f)
    loss_fn = CausalLMLoss(model, cfg.train.trained_logits_only, cfg.train.fused_decoder, cfg.train.shared_prefix,
                           padding_free=cfg.train.padding_free, kernels=cfg.train.kernels)
    rep.info(f"fast path: {loss_fn.path}")
    loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    state = LoopState()
    if ckpt is not None:
        restored = load_checkpoint(ckpt, model, optimizer, scheduler, lambda sd: load_optimizer_state(accelerator, loss_fn, optimizer, sd))
        state = LoopState(**{k: v for k, v in restored.items() if k in LoopState.__dataclass_fields__})
        rep.info(f"resumed from {ckpt} at step {state.step}")
    rep.info(f"{len(data.train)} train / {len(data.eval)} eval examples; {steps_per_epoch} steps per epoch; {total_steps} steps; "
             f"lr {cfg.lr:g}; effective batch {cfg.train.batch_size * micro_per_step} ({cfg.train.batch_size} x {ga} accumulation x {world} process(es))")

    def evaluate() -> float:
        """Mean loss over every trained token of the eval set (all processes)."""
        sums = loss_sums(loss_fn, data.eval, cfg.train.eval_batch_size or cfg.train.batch_size, pad_id, device,
                         built.compute_dtype, accelerator.process_index, accelerator.num_processes)
        total = accelerator.reduce(sums, reduction="sum")
        return (total[0] / total[1].clamp(min=1)).item()

    def save_best() -> None:
        gathered = full_trainable_state(accelerator, loss_fn) if is_fsdp(accelerator) else None  # FSDP: a collective
        if accelerator.is_main_process:
            save_trained(accelerator.unwrap_model(loss_fn).model, tokenizer, cfg.method, run_dir, gathered)

    result = TrainResult(run_dir, state.step, None, None, False)
    if ckpt is not None and data.eval and cfg.early_stopping_on and state.bad_evals >= cfg.train.early_stopping.patience:
        # the checkpoint is the one written when early stopping ended the run: nothing to resume
        rep.info(f"the run stopped early at step {state.step} (best step {state.best_step}); nothing to resume")
        result.stopped_early = True
        total_steps = state.step
    if data.eval and cfg.early_stopping_on and state.step == 0:
        base_eval = evaluate()
        rep.info(f"eval loss before training: {base_eval:.4f}")
        rep.metrics(event="eval", step=0, epoch=0.0, lr=scheduler.get_last_lr()[0], eval_loss=base_eval, trained_tokens=0)

    # ---------------------------------------------------------------- loop
    loss_fn.train()
    rep.start(total_steps, state.step)
    t_log, tokens_since_log = time.perf_counter(), 0
    t_loop, eval_seconds = time.perf_counter(), 0.0
    c_loop, eval_cpu_seconds = time.process_time(), 0.0
    while state.step < total_steps:
        # This process's share of the global batch; each micro-batch runs as one or more passes
        # of at most max_tokens_per_pass tokens.
        batches = [collate(part, pad_id) for mb in stream.for_step(state.micro, ga, rank, world)
                   for part in split_by_tokens([data.train[i] for i in mb], cfg.train.max_tokens_per_pass)]
        state.micro += micro_per_step
        # Loss = sum over trained tokens / trained tokens of the whole effective batch, on
        # every process; DDP averages gradients over processes, hence the * world size.
        n_local = torch.tensor(sum(b.n_trained for b in batches), device=device)
        n_global = accelerator.reduce(n_local.clone(), reduction="sum").clamp(min=1)
        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        passes = equalize_passes(accelerator, batches)  # FSDP: the same number of passes on every process
        for j, (b, weight) in enumerate(passes):
            b = b.to(device)
            sync = accelerator.no_sync(loss_fn) if j < len(passes) - 1 else contextlib.nullcontext()
            with sync, autocast_for(device, built.compute_dtype):
                loss_sum, _ = loss_fn(b.input_ids, b.attention_mask, b.labels)
            accelerator.backward(loss_sum * (weight * world) / n_global)
            step_loss += weight * loss_sum.detach().double()
            tokens_since_log += int(weight) * b.n_real
            result.real_tokens += int(weight) * b.n_real
        grad_norm = float(accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm or math.inf))  # inf: measured, not clipped
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.trained_tokens += int(n_global)
        train_loss = (accelerator.reduce(step_loss, reduction="sum") / n_global).item()
        result.losses.append(train_loss)

        elapsed = time.perf_counter() - t_log
        tps = tokens_since_log * world / max(elapsed, 1e-9)
        rep.step(state.step, train_loss, lr, tps)
        if state.step % cfg.train.log_every == 0:
            rep.metrics(event="train", step=state.step, epoch=state.micro / stream.per_epoch, lr=lr, train_loss=train_loss,
                        trained_tokens=state.trained_tokens, tokens_per_s=tps, grad_norm=grad_norm)
            result.tokens_per_s = tps
            t_log, tokens_since_log = time.perf_counter(), 0
        for f in diag.train_step(state.step, train_loss, grad_norm):
            rep.finding(f)

        # ------------------------------------------------------------ eval, early stopping
        stop = False
        if data.eval and (state.step % eval_every == 0 or state.step == total_steps):
            t_eval, c_eval = time.perf_counter(), time.process_time()
            ev = evaluate()
            result.eval_losses.append((state.step, ev))
            rep.metrics(event="eval", step=state.step, epoch=state.micro / stream.per_epoch, lr=lr, eval_loss=ev, trained_tokens=state.trained_tokens)
            for f in diag.eval(state.step, ev):
                rep.finding(f)
            if ev < state.best_eval - cfg.train.early_stopping.min_delta:
                state.best_eval, state.best_step, state.bad_evals = ev, state.step, 0
                save_best()
            else:
                state.bad_evals += 1
                stop = cfg.early_stopping_on and state.bad_evals >= cfg.train.early_stopping.patience
            t_log += time.perf_counter() - t_eval  # eval time is not training throughput
            eval_seconds += time.perf_counter() - t_eval
            eval_cpu_seconds += time.process_time() - c_eval
        if state.step % save_every == 0 or stop or state.step == total_steps:
            weights, opt_state = full_trainable_state(accelerator, loss_fn), full_optimizer_state(accelerator, loss_fn, optimizer)
            if accelerator.is_main_process:
                save_checkpoint(run_dir / "checkpoints", state.step, weights, opt_state, scheduler, state.__dict__, cfg.train.keep_checkpoints)
            accelerator.wait_for_everyone()
        if stop:
            rep.info(f"early stopping at step {state.step}: eval loss has not improved for {state.bad_evals} evals; "
                     f"best {state.best_eval:.4f} at step {state.best_step}")
            result.stopped_early = True
            break
        if stop_at_step is not None and state.step >= stop_at_step:
            break

    # ---------------------------------------------------------------- save
    result.train_seconds = time.perf_counter() - t_loop - eval_seconds
    result.train_cpu_seconds = time.process_time() - c_loop - eval_cpu_seconds
    rep.close()
    if not data.eval:
        save_best()  # no eval set: the final weights are the result
    accelerator.wait_for_everyone()
    result.steps, result.best_step, result.findings = state.step, state.best_step, diag.findings
    if data.replay is not None:
        replayed, trained = replay_share(data.train, [stream[g] for g in range(state.micro)])
        result.replay_share = replayed / max(trained, 1)
        rep.info(f"replay: {100 * result.replay_share:.1f}% of the {trained} trained tokens (asked {100 * data.replay.fraction:.1f}%)")
        rep.metrics(event="replay", step=state.step, replay_share=result.replay_share, replay_tokens=replayed, trained_tokens=trained)
    result.best_eval = state.best_eval if math.isfinite(state.best_eval) else None
    mem = peak_memory_bytes(device)
    rep.info(f"done: {state.step} steps; " + (f"best eval loss {result.best_eval:.4f} at step {state.best_step}; " if result.best_eval is not None else "")
             + f"result in {run_dir / ('model' if cfg.method == 'full' else 'adapter')}; "
             + "; ".join(f"{k} {format_bytes(v)}" for k, v in mem.items()))
    return result


