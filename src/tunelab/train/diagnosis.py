"""Live diagnosis of a run: what the loss, eval loss, gradient norm and schedule say, in words.

One :class:`Diagnoser` watches the run step by step (the recipe feeds it) and also replays a
finished run's metrics.jsonl (``tunelab diagnose RUN``), so both give the same findings. Each
finding is reported once, as what was seen, why it matters and the fix, citing
docs/practices.md:

* ``overfitting``: eval loss above its best for ``patience`` evals while train loss fell;
* ``memorizing``: train loss under a floor (0.05) on a small dataset;
* ``loss_spike`` / ``early_spike_no_warmup``: a step's loss above 2x the moving average,
  the second in the first 10% of steps with no warmup;
* ``nonfinite``: a NaN or inf loss or gradient norm (reported here; stopping is the guard's job);
* ``grad_explosion``: a gradient norm over 10x the median of the recent ones;
* ``constant_lr``: a schedule that ends at (nearly) its peak learning rate, without decay.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

MEMORIZE_FLOOR = 0.05
SMALL_DATA = 2000  # training examples at most, for the memorizing check
SPIKE_FACTOR, SPIKE_WINDOW = 2.0, 10
GRAD_FACTOR, GRAD_WINDOW = 10.0, 20
EARLY = 0.10  # share of the steps that counts as early
PRACTICES = "docs/practices.md"


@dataclass
class Finding:
    code: str
    step: int
    what: str
    why: str
    fix: str
    anchor: str

    @property
    def doc(self) -> str:
        return f"{PRACTICES}#{self.anchor}"

    def text(self) -> str:
        return f"{self.code} at step {self.step}: {self.what}\n  why: {self.why}\n  fix: {self.fix} ({self.doc})"

    def event(self) -> dict:
        return {"event": "diagnosis", **asdict(self), "doc": self.doc}


@dataclass
class RunContext:
    """What the checks need to know about the run besides its metrics."""

    total_steps: int
    n_train: int
    warmup: float  # fraction of the steps
    schedule: str
    min_lr_ratio: float
    patience: int = 3


class Diagnoser:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.seen: set[str] = set()
        self.findings: list[Finding] = []
        self._losses: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self._norms: deque[float] = deque(maxlen=GRAD_WINDOW)
        self._train_at: list[tuple[int, float]] = []  # (step, train-loss moving average)
        self._evals: list[tuple[int, float]] = []

    def _emit(self, code: str, step: int, what: str, why: str, fix: str, anchor: str) -> list[Finding]:
        if code in self.seen:
            return []
        self.seen.add(code)
        f = Finding(code, step, what, why, fix, anchor)
        self.findings.append(f)
        return [f]

    def start(self) -> list[Finding]:
        c = self.ctx
        end_ratio = 1.0 if c.schedule == "constant_with_warmup" else c.min_lr_ratio
        if end_ratio >= 0.9:
            how = "train.schedule is constant_with_warmup" if c.schedule == "constant_with_warmup" else f"train.min_lr_ratio is {c.min_lr_ratio:g}"
            return self._emit("constant_lr", 0, f"the learning rate ends at {100 * end_ratio:.0f}% of its peak ({how}): no decay",
                              "a high constant rate keeps moving the weights away from the pretrained solution and never settles",
                              "use train.schedule: cosine (the default) with train.min_lr_ratio 0-0.1", "schedule-decay")
        return []

    def train_step(self, step: int, loss: Optional[float], grad_norm: Optional[float] = None) -> list[Finding]:
        out: list[Finding] = []
        bad = [name for name, v in (("loss", loss), ("gradient norm", grad_norm)) if v is not None and not math.isfinite(v)]
        if loss is None or bad:
            out += self._emit("nonfinite", step, f"the {' and '.join(bad) or 'loss'} is NaN or inf",
                              "one non-finite update corrupts every weight it touches; the steps after it learn nothing",
                              "lower train.lr, keep train.max_grad_norm set and train.warmup > 0, or use model.dtype: fp32; "
                              "resume from the last good checkpoint", "hp-lr")
            return out
        if len(self._losses) >= 5:
            avg = sum(self._losses) / len(self._losses)
            if loss > SPIKE_FACTOR * avg:
                early = step <= max(1, EARLY * self.ctx.total_steps)
                if early and self.ctx.warmup == 0:
                    out += self._emit("early_spike_no_warmup", step, f"loss {loss:.3g} is {loss / avg:.1f}x its moving average {avg:.3g}, "
                                      f"in the first {100 * EARLY:.0f}% of the steps, with no warmup",
                                      "full-size updates while the optimizer's moment estimates are still poor throw the weights off",
                                      "set train.warmup to 0.03-0.1", "hp-warmup")
                else:
                    out += self._emit("loss_spike", step, f"loss {loss:.3g} is {loss / avg:.1f}x its moving average {avg:.3g}",
                                      "a spike is an update too large for the loss surface: a bad batch or too high a learning rate",
                                      "lower train.lr, raise the effective batch (train.grad_accum), check the data around this step", "hp-lr")
        self._losses.append(loss)
        self._train_at.append((step, sum(self._losses) / len(self._losses)))
        if grad_norm is not None:
            if len(self._norms) >= 5:
                med = statistics.median(self._norms)
                if med > 0 and grad_norm > GRAD_FACTOR * med:
                    out += self._emit("grad_explosion", step, f"gradient norm {grad_norm:.3g} is {grad_norm / med:.0f}x the recent median {med:.3g}",
                                      "exploding gradients make one update undo many; with no clipping they can diverge the run",
                                      "keep train.max_grad_norm at 1.0 (clipping), lower train.lr, add warmup", "hp-warmup")
            self._norms.append(grad_norm)
        avg = self._train_at[-1][1]
        if avg < MEMORIZE_FLOOR and self.ctx.n_train <= SMALL_DATA and len(self._losses) == self._losses.maxlen:
            out += self._emit("memorizing", step, f"train loss {avg:.3g} (moving average) is under {MEMORIZE_FLOOR} on {self.ctx.n_train} training examples",
                              "a loss near zero on a small dataset means the examples are memorized, not the task learned",
                              "train fewer epochs, keep early stopping on, raise lora.dropout to 0.1, add data or augment it", "overfit-zero-loss")
        return out

    def eval(self, step: int, eval_loss: Optional[float]) -> list[Finding]:
        if eval_loss is None or not math.isfinite(eval_loss):
            return self._emit("nonfinite", step, "the eval loss is NaN or inf", "the weights at this step are broken",
                              "lower train.lr and resume from the last good checkpoint", "hp-lr")
        self._evals.append((step, eval_loss))
        trained = [(s, e) for s, e in self._evals if s > 0]
        if len(trained) <= self.ctx.patience:
            return []
        best_i = min(range(len(trained)), key=lambda i: trained[i][1])
        since = len(trained) - 1 - best_i
        if since < self.ctx.patience or eval_loss <= trained[best_i][1]:
            return []
        t_best, t_now = self._train_avg(trained[best_i][0]), self._train_avg(step)
        if t_best is None or t_now is None or t_now >= t_best:
            return []
        return self._emit("overfitting", step, f"eval loss {eval_loss:.4g} has been above its best {trained[best_i][1]:.4g} (step {trained[best_i][0]}) "
                          f"for {since} evals while train loss fell from {t_best:.4g} to {t_now:.4g}",
                          "the model is fitting the training examples, not the task: held-out quality is getting worse",
                          "keep early stopping on (it keeps the best step), train fewer epochs, raise lora.dropout, add or augment data",
                          "overfit-curves")

    def _train_avg(self, step: int) -> Optional[float]:
        before = [v for s, v in self._train_at if s <= step]
        return before[-1] if before else None


def replay_metrics(rows: Iterable[dict], ctx: RunContext) -> Diagnoser:
    """A Diagnoser fed a finished run's metrics.jsonl rows, in order."""
    d = Diagnoser(ctx)
    d.start()
    for r in rows:
        if r.get("event") == "train":
            d.train_step(int(r["step"]), r.get("train_loss"), r.get("grad_norm"))
        elif r.get("event") == "eval":
            d.eval(int(r["step"]), r.get("eval_loss"))
    return d
