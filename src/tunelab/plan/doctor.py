"""``tunelab doctor``: a config checked against the practices before compute is spent.

Each rule is a function of a :class:`Context` (the resolved config, the model's shape from its
config.json, the tokenizer's template, the data's facts from the audit passes, the memory
estimates) that returns findings. Each finding says what is wrong, why it matters, the fix,
and the section of docs/practices.md with the rule and its source.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from ..config import Config
from .facts import DataFacts
from .memory import Estimate, ModelShape, gb

ERROR, WARN, INFO = "error", "warn", "info"
SEVERITY_ORDER = {ERROR: 0, WARN: 1, INFO: 2}
DOCS = "docs/practices.md"

# LoRA learning rates: 1e-5..5e-4 at ~7B (docs/practices.md#hp-lr); the range moves with size,
# by sqrt(7B / params), clamped: x7 at 135M (1e-3 there is inside: the measured winner on a
# held-out task), x0.32 at 70B. Full fine-tuning: at most 1e-4 at 7B, scaled alike.
LR_REF_PARAMS = 7e9
LORA_LR_RANGE = (1e-5, 5e-4)
FULL_LR_MAX = 1e-4
MIN_EFFECTIVE_BATCH = 8
TRUNCATION_MAX_SHARE = 0.02
TINY_DATA = 100
SMALL_DATA = 1000


def lr_scale(params: Optional[int]) -> float:
    if not params:
        return 1.0
    return min(10.0, max(0.3, math.sqrt(LR_REF_PARAMS / params)))


@dataclass
class Finding:
    code: str
    severity: str
    what: str
    why: str
    fix: str
    anchor: str

    @property
    def link(self) -> str:
        return f"{DOCS}#{self.anchor}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["link"] = self.link
        return d

    def line(self) -> str:
        return f"{self.severity:5} {self.code}: {self.what} -- fix: {self.fix} ({self.link})"


@dataclass
class Context:
    cfg: Config
    shape: Optional[ModelShape] = None
    shape_error: str = ""
    has_chat_template: Optional[bool] = None  # None: the tokenizer could not be loaded
    tokenizer_error: str = ""
    facts: Optional[DataFacts] = None
    facts_error: str = ""
    estimates: dict[str, Estimate] = field(default_factory=dict)
    memory: Optional[int] = None  # bytes available to the run
    device: str = "cpu"

    @property
    def params(self) -> Optional[int]:
        return self.shape.params if self.shape else None

    @property
    def effective_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum

    @property
    def total_steps(self) -> Optional[int]:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        if self.facts is None:
            return None
        micro = math.ceil(self.facts.n_train / t.batch_size)
        return max(1, math.ceil(t.epochs * micro / t.grad_accum))

    @property
    def epochs_seen(self) -> Optional[float]:
        """Passes over the training data the run makes (max_steps included)."""
        if self.facts is None or not self.facts.n_train:
            return None if self.cfg.train.max_steps else float(self.cfg.train.epochs)
        if not self.cfg.train.max_steps:
            return float(self.cfg.train.epochs)
        return self.cfg.train.max_steps * self.effective_batch / self.facts.n_train


Rule = Callable[[Context], list[Finding]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


# --------------------------------------------------------------------------- rules

@rule
def learning_rate(c: Context) -> list[Finding]:
    lr, s = c.cfg.lr, lr_scale(c.params)
    size = f"{c.params / 1e9:.2g}B-parameter" if c.params else "this"
    sweep = "run tunelab sweep CONFIG --lr ... : the sweep's eval loss is the arbiter"
    if c.cfg.method == "full":
        hi = FULL_LR_MAX * s
        if lr > hi:
            return [Finding("lr_range", WARN, f"lr {lr:g} is above {hi:.1g}, the top of the full fine-tuning range for a {size} model",
                            "full fine-tuning updates every weight: rates near LoRA's overwrite what pretraining learned",
                            f"set train.lr to about 1e-5 (x{s:.2g} for this size), or {sweep}", "hp-lr")]
        return []
    lo, hi = LORA_LR_RANGE[0] * s, LORA_LR_RANGE[1] * s
    if lo <= lr <= hi:
        return []
    side = "below" if lr < lo else "above"
    return [Finding("lr_range", WARN, f"lr {lr:g} is {side} {lo:.1g}-{hi:.1g}, the LoRA range for a {size} model "
                    f"(1e-5-5e-4 at 7B, scaled by sqrt(7B/params) = x{s:.2g})",
                    "too low learns nothing in the budget; too high diverges or forgets; smaller models take higher rates",
                    f"{sweep} (e.g. --lr {lo * 4:.1g},{math.sqrt(lo * hi):.1g},{hi / 2:.1g})", "hp-lr")]


@rule
def lora_shape(c: Context) -> list[Finding]:
    if c.cfg.method == "full":
        return []
    out = []
    r, alpha = c.cfg.lora.rank, c.cfg.lora_alpha
    if r > 128:
        out.append(Finding("lora_rank", WARN, f"lora.rank {r} is above 128", "a rank that high costs memory and steps without a gain, "
                           "and moves LoRA toward full fine-tuning's overfitting", "use 8-64 (16 is the default); sweep the rank with --rank", "lora-rank"))
    ratio = alpha / r
    if not 0.5 <= ratio <= 4:
        out.append(Finding("lora_alpha", WARN, f"lora.alpha/rank = {alpha:g}/{r} = {ratio:.2g}, far from 1-2",
                           "the update is scaled by alpha/rank: far from 1-2 acts as a much smaller or larger learning rate",
                           f"set lora.alpha to {r}-{2 * r} (or leave it unset: 2 x rank)", "lora-alpha"))
    targets = c.cfg.lora.targets
    wide = targets not in ("qv",) and not (isinstance(targets, list) and set(t.rsplit(".", 1)[-1] for t in targets) <= {"q_proj", "v_proj"})
    if wide and c.facts is not None and c.facts.n_train < SMALL_DATA:
        out.append(Finding("lora_targets", INFO, f"lora.targets {targets!r} on {c.facts.n_train} records",
                           "q_proj+v_proj is the usual start; more targets add parameters that little data cannot fit well",
                           "start with lora.targets: qv and widen if the eval loss says the task needs it", "lora-targets"))
    return out


@rule
def epochs(c: Context) -> list[Finding]:
    t = c.cfg.train
    if t.max_steps is None and t.epochs > 3:
        return [Finding("epochs", WARN, f"train.epochs {t.epochs:g} is more than 3", "more passes over the same records memorise them",
                        "use 1-3 epochs with an eval set and early stopping", "hp-epochs")]
    seen = c.epochs_seen
    if t.max_steps and seen is not None and seen > 3 and c.facts is not None and c.facts.n_train < SMALL_DATA:
        return [Finding("epochs", WARN, f"train.max_steps {t.max_steps} x effective batch {c.effective_batch} is {seen:.1f} passes over "
                        f"{c.facts.n_train} records", "that many passes over small data trains toward zero loss: memorisation, not learning",
                        f"lower train.max_steps to about {max(1, int(3 * c.facts.n_train / c.effective_batch))} (3 epochs), or add data",
                        "overfit-zero-loss")]
    return []


@rule
def schedule(c: Context) -> list[Finding]:
    t = c.cfg.train
    out = []
    if t.warmup == 0:
        out.append(Finding("warmup", WARN, "train.warmup is 0: no warmup", "full-size updates while Adam's moment estimates are still poor "
                           "cause early loss spikes", "set train.warmup to 0.03-0.10 (default 0.05)", "hp-warmup"))
    elif not 0.03 <= t.warmup <= 0.10:
        out.append(Finding("warmup", WARN, f"train.warmup {t.warmup:g} is outside 3-10% of the steps",
                           "too short gives early spikes; too long spends the run at a low rate", "set train.warmup to 0.03-0.10", "hp-warmup"))
    if t.schedule == "constant_with_warmup" or t.min_lr_ratio >= 1:
        out.append(Finding("no_decay", WARN, "the learning rate stays constant after warmup (no decay)",
                           "a high constant rate keeps moving the weights away from the pretrained solution and does not settle",
                           "use train.schedule: cosine (default) with min_lr_ratio below 1", "schedule-decay"))
    return out


@rule
def eval_and_masking(c: Context) -> list[Finding]:
    out = []
    if not c.cfg.has_eval:
        out.append(Finding("no_eval", WARN, "no eval set (data.eval unset, data.eval_fraction 0)",
                           "without held-out loss there is no early stopping and overfitting goes unseen",
                           "set data.eval_fraction: 0.1 or data.eval: {path: ...}", "reg-early-stopping"))
    if c.cfg.data.train_on == "all":
        out.append(Finding("train_on_all", WARN, "data.train_on: all trains on the prompt tokens too",
                           "the model learns to repeat the instructions and the loss is diluted by tokens it is given",
                           "use data.train_on: assistant (default)", "loss-masking"))
    return out


@rule
def template(c: Context) -> list[Finding]:
    if c.has_chat_template is None:
        return [Finding("template_unchecked", INFO, f"the tokenizer of {c.cfg.model.name!r} could not be loaded: template not checked",
                        c.tokenizer_error[:200] or "no tokenizer", "check model.name", "template-parity")] if c.tokenizer_error else []
    if c.cfg.template == "auto" and not c.has_chat_template:
        return [Finding("no_template", ERROR, "template: auto, but the tokenizer has no chat template",
                        "there is nothing to render the conversations with; training would stop at the first record",
                        "set template: to one of chatml, llama3, llama2, mistral, alpaca, plain, and use the same at inference", "template-parity")]
    if c.cfg.template != "auto" and c.has_chat_template:
        return [Finding("template_differs", WARN, f"template: {c.cfg.template} differs from the tokenizer's own chat template",
                        "a model served with its own template (vLLM, llama.cpp, transformers' apply_chat_template) then sees prompts "
                        "unlike the training ones", "use template: auto, or make sure inference uses the same template", "template-parity")]
    return []


@rule
def batching(c: Context) -> list[Finding]:
    eb = c.effective_batch
    if eb >= MIN_EFFECTIVE_BATCH:
        return []
    t = c.cfg.train
    return [Finding("small_batch", WARN, f"effective batch {eb} ({t.batch_size} x {t.grad_accum} accumulation) is below {MIN_EFFECTIVE_BATCH}",
                    "few examples per step give noisy gradients and an unstable loss",
                    f"raise train.grad_accum to {math.ceil(MIN_EFFECTIVE_BATCH / t.batch_size)} (memory stays the same)", "hp-batch")]


@rule
def truncation(c: Context) -> list[Finding]:
    f = c.facts
    if f is None or not f.n_train:
        return []
    n = f.n_train + f.n_eval
    share = f.over / max(n, 1)
    if share <= TRUNCATION_MAX_SHARE:
        return []
    how = "dropped" if c.cfg.data.truncation == "drop" else "truncated"
    unit = f.unit if f.unit == "tokens" else "words (a lower bound: no tokenizer)"
    sugg = f.suggested_max_seq_len()
    return [Finding("truncation", WARN, f"{f.over} of {n} records ({100 * share:.1f}%) are longer than max_seq_len={c.cfg.data.max_seq_len} "
                    f"{unit} and will be {how}" + (f"; {f.partly + f.entirely} lose completion tokens" if f.partly + f.entirely else ""),
                    "those records are never trained as written: what they teach is lost silently",
                    f"set data.max_seq_len: {sugg} (keeps 99% of the records whole; p99 {f.total.get('p99')} {f.unit})", "data-truncation")]


@rule
def data_size(c: Context) -> list[Finding]:
    f = c.facts
    if f is None or f.n_train >= TINY_DATA:
        return []
    seen = c.epochs_seen or 0
    steps = c.total_steps or 0
    if seen <= 3:
        return []
    return [Finding("tiny_data", WARN, f"{f.n_train} training records (< {TINY_DATA}) for {steps} steps ({seen:.0f} passes)",
                    "a tiny dataset seen many times is memorised: train loss goes to zero, held-out quality does not follow",
                    "collect more records (hundreds at least) or cut the steps to 1-3 passes", "overfit-zero-loss")]


@rule
def knowledge(c: Context) -> list[Finding]:
    f = c.facts
    if f is None or not f.knowledge.fires:
        return []
    return [Finding("knowledge_injection", WARN, f"the completions look like facts to memorise: {f.knowledge.summary()}",
                    "SFT teaches format and behaviour, not facts; consider retrieval (RAG). Facts fine-tuned in are recalled poorly and raise hallucination",
                    "consider retrieval (RAG): put the facts in a store and fine-tune, if at all, on answering from retrieved text",
                    "sft-format-not-facts")]


@rule
def memory(c: Context) -> list[Finding]:
    if not c.estimates or not c.memory:
        return []
    m = c.cfg.method
    est = c.estimates
    have = gb(c.memory)
    fits = {k: e.total <= c.memory for k, e in est.items()}
    where = f"{have} ({c.device})"
    if m == "qlora" and fits["lora"]:
        return [Finding("qlora_not_needed", WARN, f"method: qlora, but LoRA fits: LoRA needs ~{gb(est['lora'].total)} of {where}",
                        "QLoRA costs a little quality and dequantizes every weight in every matmul (slower); it pays off only when memory "
                        "is the bottleneck", "use method: lora", "qlora-quality")]
    if not fits[m]:
        alt = "qlora" if m != "qlora" and fits["qlora"] else None
        fix = (f"use method: qlora (~{gb(est['qlora'].total)})" if alt else
               "lower train.batch_size (raise grad_accum to keep the effective batch), data.max_seq_len or train.max_tokens_per_pass, "
               "set train.gradient_checkpointing: true, or use a smaller model")
        return [Finding("memory_too_small", ERROR, f"method: {m} needs ~{gb(est[m].total)}, more than the {where} available",
                        "the run would fail with out-of-memory (or swap) after loading", fix, "qlora-when")]
    return []


# --------------------------------------------------------------------------- running

def check(ctx: Context) -> list[Finding]:
    out = []
    for fn in RULES:
        out += fn(ctx)
    return sorted(out, key=lambda f: SEVERITY_ORDER[f.severity])


def build_context(cfg: Config, *, memory: Optional[int] = None, device: Optional[str] = None, load_data: bool = True) -> Context:
    """Everything the rules read, gathered without loading weights. Problems gathering a part
    become an info finding's reason, never an exception (the doctor must not stop a run)."""
    from ..models.load import load_tokenizer, resolve_model_path
    from .memory import ModelConfigError, Workload, available_memory, estimate_all, load_shape

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = Context(cfg, device=device)
    try:
        ctx.shape = load_shape(cfg.model.name)
    except (ModelConfigError, OSError, ValueError) as e:
        ctx.shape_error = str(e)
    renderer = None
    try:
        tok = load_tokenizer(resolve_model_path(cfg.model.name), cfg.model.trust_remote_code)
        ctx.has_chat_template = bool(getattr(tok, "chat_template", None))
        from ..data.render import Renderer

        template = cfg.template if (cfg.template != "auto" or ctx.has_chat_template) else "chatml"
        renderer = Renderer(tok, template, cfg.data.train_on)
    except Exception as e:  # hub unreachable, missing package: reported, not raised
        ctx.tokenizer_error = f"{type(e).__name__}: {e}"
    if load_data and cfg.data.train:
        try:
            from .facts import data_facts

            evals = [cfg.data.eval] if cfg.data.eval is not None else []
            ctx.facts = data_facts(cfg.data.train, evals, renderer, cfg.data.max_seq_len, cfg.train.seed, 0.05 if cfg.data.eval_fraction is None else cfg.data.eval_fraction)  # null: the default 5% hold-out
        except Exception as e:
            ctx.facts_error = f"{type(e).__name__}: {e}"
    if ctx.shape is not None:
        seq = cfg.data.max_seq_len
        if ctx.facts is not None and ctx.facts.unit == "tokens" and ctx.facts.total.get("max"):
            seq = min(seq, int(ctx.facts.total["max"]))
        frac = ctx.facts.trained_fraction if ctx.facts else 0.5
        ctx.estimates = estimate_all(ctx.shape, Workload.from_config(cfg, device, seq, frac))
        ctx.memory = memory if memory is not None else available_memory(device)
    return ctx


def diagnose(cfg: Config, **kw: Any) -> tuple[list[Finding], Context]:
    ctx = build_context(cfg, **kw)
    return check(ctx), ctx


def summary_lines(findings: list[Finding], limit: int = 6) -> list[str]:
    """A few lines for the start of a training run."""
    if not findings:
        return ["doctor: no findings"]
    counts = {s: sum(1 for f in findings if f.severity == s) for s in (ERROR, WARN, INFO)}
    head = "doctor: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + " (tunelab doctor CONFIG for the reasons)"
    lines = [head] + [f"  {f.severity:5} {f.code}: {f.what} -> {f.fix}" for f in findings[:limit]]
    if len(findings) > limit:
        lines.append(f"  ... {len(findings) - limit} more")
    return lines


def format_report(findings: list[Finding], ctx: Context) -> str:
    lines = []
    if ctx.shape is not None:
        lines.append(f"model: {ctx.cfg.model.name} ({ctx.shape.params / 1e6:,.0f}M parameters, {ctx.shape.layers} layers, hidden {ctx.shape.hidden})")
    elif ctx.shape_error:
        lines.append(f"model: {ctx.shape_error} (size-scaled and memory rules skipped)")
    if ctx.facts is not None:
        f = ctx.facts
        lines.append(f"data: {f.n_train} train / {f.n_eval} eval records; length p50 {f.total.get('p50')} p99 {f.total.get('p99')} "
                     f"max {f.total.get('max')} {f.unit}")
    elif ctx.facts_error:
        lines.append(f"data: could not be read ({ctx.facts_error[:200]}); data rules skipped")
    if ctx.estimates:
        e = ctx.estimates[ctx.cfg.method]
        lines.append(f"memory: {ctx.cfg.method} needs ~{gb(e.total)} (weights {gb(e.weights)}, activations {gb(e.activations)}) "
                     f"of {gb(ctx.memory or 0)} on {ctx.device}")
    if not findings:
        lines.append("no findings: the config follows docs/practices.md")
    for f in findings:
        lines += [f"{f.severity.upper()} [{f.code}] {f.what}", f"    why: {f.why}", f"    fix: {f.fix}", f"    see: {f.link}"]
    return "\n".join(lines)
