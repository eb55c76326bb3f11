"""Strategy advice: method, rank, targets, LR, epochs, batch and accumulation, max_seq_len,
from the model's config, the data's facts and the memory available.

The choices follow docs/practices.md: LoRA is the default (#lora-default); QLoRA only when
LoRA does not fit (#qlora-when); rank 8-32 and q/v targets on a first run (#lora-rank,
#lora-targets); the LR scaled by model size (#hp-lr); 1-3 epochs, fewer on more data
(#hp-epochs); an effective batch of 8-16 (#hp-batch); max_seq_len at the data's p99
(#data-truncation); retrieval instead when the data smells of knowledge injection
(#sft-format-not-facts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from .doctor import lr_scale
from .facts import DataFacts
from .memory import Estimate, ModelShape, Workload, estimate, estimate_all, gb

WORDS_TO_TOKENS = 1.5  # without a tokenizer the audit counts words; tokens are ~1.3-1.5 per English word
HEADROOM = 0.9  # advise a setup that needs at most 90% of the memory: allocator fragmentation, other processes


@dataclass
class Advice:
    method: Optional[str]  # None: nothing fits
    rank: int
    targets: str
    lr: float
    epochs: int
    batch_size: int
    grad_accum: int
    max_seq_len: int
    tokens_per_pass: int
    gradient_checkpointing: bool
    retrieval: bool
    estimate: Optional[Estimate]
    estimates: dict[str, Estimate] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        if self.method is None:
            return ""
        return "\n".join([
            f"method: {self.method}",
            f"data: {{max_seq_len: {self.max_seq_len}, eval_fraction: 0.1}}",
            f"lora: {{rank: {self.rank}, targets: {self.targets}}}",
            f"train: {{lr: {self.lr:g}, epochs: {self.epochs}, batch_size: {self.batch_size}, grad_accum: {self.grad_accum}, "
            f"max_tokens_per_pass: {self.tokens_per_pass}, gradient_checkpointing: {str(self.gradient_checkpointing).lower()}}}",
        ])


def _round_lr(x: float) -> float:
    e = math.floor(math.log10(x))
    return round(x / 10**e) * 10**e


def advise(shape: ModelShape, facts: Optional[DataFacts], memory: int, device: str, compute_bytes: int = 2) -> Advice:
    reasons: list[str] = []
    n = facts.n_train if facts else None
    # lengths
    if facts and facts.total.get("p99"):
        p99 = facts.total["p99"] * (WORDS_TO_TOKENS if facts.unit != "tokens" else 1)
        seq = max(64, int(64 * math.ceil(p99 / 64)))
        how = f"p99 of the rendered lengths, {facts.total['p99']} {facts.unit}" + (f" x{WORDS_TO_TOKENS} tokens per word (no tokenizer)" if facts.unit != "tokens" else "")
        reasons.append(f"max_seq_len {seq}: the {how}, rounded up to 64; keeps 99% of the records whole")
        frac = facts.trained_fraction or 0.5
    else:
        seq, frac = 1024, 0.5
        reasons.append("max_seq_len 1024: no data given (give --data for the p99 of its lengths)")
    # size-dependent hyperparameters
    rank = 8 if n is not None and n < 1000 else (32 if n is not None and n >= 20000 else 16)
    targets = "all-linear" if n is not None and n >= 20000 else "qv"
    reasons.append(f"rank {rank}, targets {targets}: " + ("little data: a small adapter on q/v is the usual start" if rank == 8 else
                   "much data: a wider adapter has the data to fit it" if rank == 32 else "the usual first run (q_proj + v_proj)"))
    s = lr_scale(shape.params)
    lr = _round_lr(2e-4 * min(5.0, max(0.5, s)))
    reasons.append(f"lr {lr:g}: 2e-4 at 7B, scaled by sqrt(7B/params) = x{s:.2g} (clamped to 0.5-5); sweep 3 rates around it before the full run")
    epochs = 3 if n is not None and n < 1000 else (2 if n is None or n < 10000 else 1)
    reasons.append(f"epochs {epochs}: " + (f"{n} records" if n is not None else "no data given") + "; 1-3 passes, fewer on more data, early stopping on an eval split")
    eff = 16 if n is not None and n >= 2000 else 8

    # method and batch shape: the first that fits, preferring LoRA, no checkpointing, bigger passes
    base = Workload("lora", rank, targets, min(8, eff), seq, 2048, compute_bytes, device, False, frac, True)
    estimates = estimate_all(shape, base)
    chosen: Optional[tuple[str, Workload, Estimate]] = None
    # preference: LoRA before QLoRA; no checkpointing (it recomputes the forward) before smaller passes
    # (max_tokens_per_pass: the same step, less memory) before smaller micro-batches
    candidates = [(m, gc, tpp, bs) for m in ("lora", "qlora") for gc in (False, True)
                  for bs in dict.fromkeys((min(8, eff), 4, 2, 1)) for tpp in dict.fromkeys((2048, max(seq, 512), seq))]
    for method, gc, tpp, bs in candidates:
        w = replace(base, method=method, batch_size=bs, tokens_per_pass=tpp, gradient_checkpointing=gc)
        e = estimate(shape, w)
        if e.total <= HEADROOM * memory:
            chosen = (method, w, e)
            break
    here = f"{gb(memory)} ({device})"
    lines = ", ".join(f"{m} ~{gb(e.total)}" for m, e in estimates.items())
    if chosen is None:
        reasons.insert(0, f"nothing fits 90% of {here} even at batch 1 with gradient checkpointing ({lines}): use a smaller model, "
                          "shorter sequences, or more memory (several GPUs with FSDP)")
        return Advice(None, rank, targets, lr, epochs, 1, eff, seq, seq, True, bool(facts and facts.knowledge.fires), None, estimates, reasons)
    method, w, e = chosen
    if method == "lora":
        reasons.insert(0, f"method lora: it fits {here} with 10% headroom (needs ~{gb(e.total)}; at batch {base.batch_size}: {lines}); LoRA is the default, "
                          "QLoRA would cost quality and speed for memory that is not short")
        if estimates["full"].total <= memory and n is not None and n >= 50000:
            reasons.append(f"full fine-tuning also fits (~{gb(estimates['full'].total)}) and the data is large: worth a comparison run")
    else:
        reasons.insert(0, f"method qlora: LoRA does not fit 90% of {here} at any batch, pass size or with checkpointing "
                          f"(~{gb(estimates['lora'].total)} at batch {base.batch_size}), QLoRA does (~{gb(e.total)}): "
                          "memory is the bottleneck, the case QLoRA is for")
        if device == "cpu":
            reasons.append("on the CPU QLoRA dequantizes every weight in every matmul: expect it several times slower than LoRA")
    if w.batch_size != base.batch_size or w.gradient_checkpointing or w.tokens_per_pass != 2048:
        reasons.append(f"to fit: batch {w.batch_size}, passes of {w.tokens_per_pass} tokens"
                       + (", gradient checkpointing on" if w.gradient_checkpointing else ""))
    ga = max(1, math.ceil(eff / w.batch_size))
    reasons.append(f"batch {w.batch_size} x accumulation {ga} = effective batch {w.batch_size * ga}")
    retrieval = bool(facts and facts.knowledge.fires)
    if retrieval:
        reasons.insert(0, f"retrieval instead: {facts.knowledge.summary()}. SFT teaches format and behaviour, not facts; "
                          "put the facts in a retrieval store (RAG) and fine-tune, if at all, on answering from retrieved text")
    return Advice(method, rank, targets, lr, epochs, w.batch_size, ga, seq, w.tokens_per_pass, w.gradient_checkpointing, retrieval, e, estimates, reasons)


def format_advice(a: Advice, shape: ModelShape, memory: int, device: str) -> str:
    out = [f"model: {shape.name} ({shape.params / 1e9:.3g}B parameters; {shape.layers} layers, hidden {shape.hidden}, "
           f"vocab {shape.vocab}) on {gb(memory)} {device}"]
    out.append("memory estimate (from config.json, no weights loaded):")
    out.append(f"  {'method':7} {'total':>9} {'weights':>9} {'grads+opt':>10} {'activ.':>9} {'logits':>9} {'overhead':>9}")
    for m, e in a.estimates.items():
        out.append(f"  {m:7} {gb(e.total):>9} {gb(e.weights):>9} {gb(e.gradients + e.optimizer):>10} {gb(e.activations):>9} "
                   f"{gb(e.logits):>9} {gb(e.overhead):>9}" + ("  (peak at load)" if e.load_peak > e.train_peak else ""))
    out.append(f"recommendation: {a.method or 'none fits'}" + (" + consider retrieval (RAG) for the facts" if a.retrieval else ""))
    out += [f"  - {r}" for r in a.reasons]
    if a.method:
        out.append("config:")
        out += ["  " + line for line in a.yaml().splitlines()]
    out.append("see docs/practices.md#lora-default, #qlora-when, #hp-lr, #hp-sweep")
    return "\n".join(out)
