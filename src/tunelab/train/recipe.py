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
from ..config import Config, dump_yaml, resolved_config
from ..data.batching import MicroBatchStream, collate, split_by_tokens
from ..data.pipeline import prepare_data
from ..data.replay import replay_share
from ..data.render import Renderer
from ..files import atomic_write_json, atomic_write_text
from ..models.build import build_model
from ..models.heap import return_freed_pages
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_trained
from .guards import Interrupted, NonFiniteGuard, StopSignals, checkpoint_failed, disk_warning, drop_untrained
from .rundir import Run, join_run, open_run
from .diagnosis import Diagnoser, RunContext
from .distributed import equalize_passes, full_optimizer_state, full_trainable_state, is_fsdp, load_optimizer_state, make_accelerator, run_once
from .evaluate import autocast_for, loss_sums
from .generation_probe import GenerationProbe
from .header import DTYPE as DTYPE_NAME
from .header import Plan, header_lines, summary_lines
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
    skipped_nonfinite: int = 0  # batches skipped by train.on_nonfinite: skip_batch
    skipped_empty: int = 0  # passes / steps with no trained token, never averaged in


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


def train(cfg: Config, overrides: tuple[str, ...] | list[str] = (), resume: bool = False, stop_at_step: Optional[int] = None,
          console: Optional[Console] = None, overwrite: bool = False) -> TrainResult:
    """Fine-tune per ``cfg``. ``stop_at_step`` ends the run early as an interruption would
    (used by the resume tests); everything else comes from the config. The run dir is claimed
    (refused if it holds another run, locked, see rundir.py) for the whole run."""
    accelerator = make_accelerator()  # one process, or DDP / FSDP under accelerate launch
    run = open_run(cfg, resume, overwrite, accelerator.num_processes) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    run = run or join_run(cfg, resume)
    signals = StopSignals()
    try:
        return _train(cfg, overrides, run, accelerator, signals, stop_at_step, console)
    finally:
        signals.restore()
        run.close()


def _train(cfg: Config, overrides: tuple[str, ...] | list[str], run: Run, accelerator, signals: StopSignals,
           stop_at_step: Optional[int], console: Optional[Console]) -> TrainResult:
    from accelerate.utils import set_seed

    # ---------------------------------------------------------------- setup
    device = accelerator.device
    run_dir = cfg.run_dir
    ckpt = run.checkpoint
    resume_step = int(ckpt.name.split("-")[1]) if ckpt else None
    rep = make_reporter(accelerator.is_main_process, run_dir, console, resume_step, cfg)  # + cfg.report_to trackers
    for note in run.notes:
        rep.warn(note)
    rep.info(f"[bold]tunelab train[/bold] {cfg.name} -> {run_dir}  ({accelerator.num_processes} process(es) on {device})")
    set_seed(cfg.train.seed)

    built = build_model(cfg, device)
    model, tokenizer = built.model, built.tokenizer
    renderer = Renderer.from_config(tokenizer, cfg)
    data = prepare_data(cfg, renderer)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.train.weight_decay, betas=(0.9, 0.999))
    if accelerator.is_main_process and (low := disk_warning(run_dir, trainable, cfg.train.keep_checkpoints)):
        rep.warn(low)
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
                           padding_free=cfg.train.padding_free, kernels=cfg.train.kernels,
                           compile_pointwise=cfg.train.compile_pointwise)

    # ---------------------------------------------------------------- header: one screen
    plan = Plan(total_steps, steps_per_epoch, eval_every, save_every, micro_per_step, world, loss_fn.path)
    lines, warnings = header_lines(cfg, built, data, plan, list(overrides))
    for line in lines:
        rep.line(line)
    for w in warnings:
        rep.warn(w)
    rep.info(data.eval_note)
    if data.replay is not None and cfg.data.audit == "off":
        rep.info(data.replay.summary())  # else the audit summary shows it
    rep.table("parameters", *memory_report(model))
    if accelerator.is_main_process:  # the resolved config: derived values filled in, reruns as is
        atomic_write_text(run_dir / "config.yaml", dump_yaml(resolved_config(
            cfg, dtype=DTYPE_NAME.get(built.compute_dtype), eval_every=eval_every, save_every=save_every)))
    audit = run_once(accelerator, lambda: audit_for_training(cfg, renderer, data, rep, fast=False))  # data.audit: off | warn | strict (strict raises)
    if audit is not None and accelerator.is_main_process:  # for the run's HTML report
        atomic_write_json(run_dir / "audit_summary.json", {"summary": audit.summary, "text": audit.summary_text()})
    if cfg.method == "qlora" and data.eval and ckpt is None:
        # What NF4 costs: the base's eval loss quantized vs unquantized (loads the latter briefly).
        if accelerator.is_main_process:
            report_quantization_cost(cfg, model, data.eval, device, tokenizer.pad_token_id or 0, rep.info, rep.warn, run_dir)
        accelerator.wait_for_everyone()

    probe = None  # eval.generate_every: train vs held-out exact match as training goes
    if cfg.eval.generate_every:
        if is_fsdp(accelerator):
            rep.warn("eval.generate_every is off under FSDP: the weights are sharded, one process cannot generate alone")
        elif not data.eval_conversations:
            rep.warn("eval.generate_every needs a held-out set (data.eval or data.eval_fraction); the probe is off")
        else:
            probe = GenerationProbe(renderer, tokenizer, data.train_conversations, data.eval_conversations, cfg.eval.generate_sample,
                                    cfg.eval.generate_max_tokens, cfg.train.eval_batch_size or cfg.train.batch_size, cfg.train.seed)
            if not (probe.train and probe.held_out):
                probe = None
                rep.warn("eval.generate_every: no train or held-out record ends in an assistant turn; the probe is off")

    loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    state = LoopState()
    if ckpt is not None:
        restored = load_checkpoint(ckpt, model, optimizer, scheduler, lambda sd: load_optimizer_state(accelerator, loss_fn, optimizer, sd),
                                   cfg.model.allow_pickle)
        state = LoopState(**{k: v for k, v in restored.items() if k in LoopState.__dataclass_fields__})
        rep.info(f"resumed from {ckpt} at step {state.step}")

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
        rep.metrics(event="eval", step=0, epoch=0.0, lr=scheduler.get_last_lr()[0], eval_loss=base_eval, trained_tokens=0)

    def checkpoint() -> None:
        weights, opt_state = full_trainable_state(accelerator, loss_fn), full_optimizer_state(accelerator, loss_fn, optimizer)
        if accelerator.is_main_process:
            try:
                save_checkpoint(run_dir / "checkpoints", state.step, weights, opt_state, scheduler, {**state.__dict__, "run_id": run.run_id},
                                cfg.train.keep_checkpoints)
            except OSError as e:  # disk full, quota, read-only: the previous checkpoint is untouched
                rep.close()
                raise checkpoint_failed(state.step, run_dir / "checkpoints", e, latest_checkpoint(run_dir / "checkpoints", run.run_id)) from None
        accelerator.wait_for_everyone()

    nonfinite = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skipped_batches)
    nonfinite.skipped = state.skipped_nonfinite

    # ---------------------------------------------------------------- loop
    loss_fn.train()
    signals.install()  # Ctrl-C / SIGTERM: checkpoint at the next step boundary, then stop
    rep.start(total_steps, state.step)
    t_log, tokens_since_log = time.perf_counter(), 0
    t_loop, eval_seconds = time.perf_counter(), 0.0
    c_loop, eval_cpu_seconds = time.process_time(), 0.0
    while state.step < total_steps:
        # This process's share of the global batch; each micro-batch runs as one or more passes
        # of at most max_tokens_per_pass tokens.
        mbs = stream.for_step(state.micro, ga, rank, world)
        batches = [collate(part, pad_id) for mb in mbs for part in split_by_tokens([data.train[i] for i in mb], cfg.train.max_tokens_per_pass)]
        batches, empty = drop_untrained(batches)  # 0 trained tokens: skipped and counted, never 0/0
        state.skipped_empty += empty
        state.micro += micro_per_step
        # Loss = sum over trained tokens / trained tokens of the whole effective batch, on
        # every process; DDP averages gradients over processes, hence the * world size.
        n_local = torch.tensor(sum(b.n_trained for b in batches), device=device)
        n_raw = accelerator.reduce(n_local.clone(), reduction="sum")
        n_global = n_raw.clamp(min=1)
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
        train_loss = (accelerator.reduce(step_loss, reduction="sum") / n_global).item()
        # clips the gradients; no trained token, or a non-finite loss/gradient: skip or stop (guards.py)
        if nonfinite.skip_step(accelerator, trainable, cfg.train.max_grad_norm, state.step + 1, train_loss, int(n_raw.item()),
                               [data.train[i].source for mb in mbs for i in mb], lambda: latest_checkpoint(run_dir / "checkpoints", run.run_id), rep):
            optimizer.zero_grad(set_to_none=True)  # no update from this batch
            state.skipped_nonfinite = nonfinite.skipped
            continue
        grad_norm = nonfinite.last_norm
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return_freed_pages()  # this step's freed activations leave RSS (models/heap.py)
        state.step += 1
        state.trained_tokens += int(n_global)
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
        if probe is not None and (state.step % cfg.eval.generate_every == 0 or state.step == total_steps):
            t_gen, c_gen = time.perf_counter(), time.process_time()
            if accelerator.is_main_process:
                em = probe(accelerator.unwrap_model(loss_fn).model, device, built.compute_dtype)
                rep.info(f"step {state.step}: exact match train {em.train_em:.1f} / held-out {em.eval_em:.1f} "
                         f"(gap {em.gap:+.1f}, {em.n_train} + {em.n_eval} prompts)")
                rep.metrics(event="generate", step=state.step, train_em=em.train_em, eval_em=em.eval_em, n_train=em.n_train, n_eval=em.n_eval)
            accelerator.wait_for_everyone()
            t_log += time.perf_counter() - t_gen  # not training throughput either
            eval_seconds += time.perf_counter() - t_gen
            eval_cpu_seconds += time.process_time() - c_gen
        interrupted = signals.requested(accelerator)
        if state.step % save_every == 0 or stop or state.step == total_steps or interrupted:
            checkpoint()
        if interrupted and state.step < total_steps and not stop:
            rep.close()
            raise Interrupted(f"stopped by {signals.name} at step {state.step} of {total_steps}; checkpoint written to "
                              f"{latest_checkpoint(run_dir / 'checkpoints', run.run_id)}", state.step)
        if stop:
            rep.info(f"early stopping at step {state.step}: eval loss has not improved for {state.bad_evals} evals; "
                     f"best {state.best_eval:.4f} at step {state.best_step}")
            rep.metrics(event="early_stop", step=state.step, eval_loss=state.best_eval, best_step=state.best_step)
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
    artifacts = {"model" if cfg.method == "full" else "adapter": run_dir / ("model" if cfg.method == "full" else "adapter"),
                 "config": run_dir / "config.yaml", "metrics": run_dir / "metrics.jsonl",
                 "audit": run_dir / "audit.json", "spot check": run_dir / "audit-spotcheck.html",
                 "checkpoints": run_dir / "checkpoints"}
    for line in summary_lines(cfg, result, artifacts):
        rep.line(line)
    skipped = [f"{state.skipped_nonfinite} non-finite batches skipped" if state.skipped_nonfinite else "",
               f"{state.skipped_empty} passes without trained tokens skipped" if state.skipped_empty else ""]
    if any(skipped):
        rep.line("; ".join(x for x in skipped if x))
    rep.line("memory: " + "; ".join(f"{k} {format_bytes(v)}" for k, v in mem.items()))
    rep.final(steps=state.step, best_eval_loss=result.best_eval, best_step=state.best_step, stopped_early=result.stopped_early,
              trained_tokens=state.trained_tokens, train_seconds=round(result.train_seconds, 3))
    return result


