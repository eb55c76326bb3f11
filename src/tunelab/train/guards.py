"""Guards around each optimizer step: empty micro-batches, non-finite loss or gradients,
Ctrl-C / SIGTERM, and a disk that fills up while checkpointing.

Each guard turns a failure that would otherwise corrupt a run (a NaN averaged into the weights,
a half-written checkpoint, a traceback) into a skipped batch that is counted, or into a stop at a
step boundary with the last good checkpoint kept and a one-line message saying what happened and
how to go on.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any, Callable, Optional, Sequence

import torch

from ..files import free_space_warning


class TrainingStopped(RuntimeError):
    """The run stopped on purpose; ``str()`` is the one line to show (no traceback)."""

    exit_code = 1


class NonFiniteError(TrainingStopped):
    pass


class CheckpointWriteError(TrainingStopped):
    pass


class Interrupted(TrainingStopped):
    exit_code = 130

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# --------------------------------------------------------------------------- empty micro-batches

def drop_untrained(batches: Sequence[Any]) -> tuple[list[Any], int]:
    """Passes with no trained token carry no loss: drop them (they would add 0/0) and count them."""
    kept = [b for b in batches if b.n_trained > 0]
    return kept, len(batches) - len(kept)


# --------------------------------------------------------------------------- non-finite loss / grads

def grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    """L2 norm of the gradients of ``params`` (this process's share)."""
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class NonFiniteGuard:
    """``train.on_nonfinite``: stop (default) or skip the batch, at most ``max_skips`` times."""

    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips = policy, max_skips
        self.skipped = 0

    def skip_step(self, accelerator: Any, params: Sequence[torch.nn.Parameter], max_grad_norm: Optional[float], step: int, loss: float,
                  n_trained: int, sources: Sequence[str], last_checkpoint: Callable[[], Any], rep: Any) -> bool:
        """Clip the gradients (``max_grad_norm``) and decide on the step: True = skip it without
        an update (no trained token in the whole batch, or a non-finite loss or gradient under
        skip_batch, logged as ``event: skip``); raises NonFiniteError to stop the run."""
        norm = float(accelerator.clip_grad_norm_(params, max_grad_norm)) if max_grad_norm else grad_norm(params)
        if accelerator.num_processes > 1:  # every process must take the same decision
            norm = accelerator.reduce(torch.tensor(norm, device=accelerator.device), reduction="mean").item()
        self.last_norm = norm  # the step's gradient norm (before clipping), for metrics.jsonl
        empty = n_trained == 0
        if not empty and not self.check(step, loss, norm, sources, last_checkpoint, rep.close):
            return False
        why = "no trained token" if empty else f"loss {loss}, gradient norm {norm}"
        rep.warn(f"step {step}: batch skipped ({why}); records {', '.join(sources[:4])}")
        rep.metrics(event="skip", step=step, train_loss=loss, grad_norm=norm, records=list(sources[:8]))
        return True

    def check(self, step: int, loss: float, norm: float, sources: Sequence[str], last_checkpoint: Callable[[], Any],
              before_stop: Callable[[], None] = lambda: None) -> bool:
        """True: skip this batch (no optimizer step). Raises NonFiniteError to stop the run."""
        if math.isfinite(loss) and math.isfinite(norm):
            return False
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
        recs = ", ".join(sources[:8]) + (f" and {len(sources) - 8} more" if len(sources) > 8 else "")
        if self.policy == "skip_batch" and self.skipped < self.max_skips:
            self.skipped += 1
            return True
        capped = f" ({self.skipped} batches already skipped, train.max_skipped_batches={self.max_skips})" if self.policy == "skip_batch" else ""
        last = last_checkpoint()
        before_stop()
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteError(
            f"non-finite {what} at step {step}{capped}; batch records: {recs}. The update was not applied and {keep}. "
            f"Lower train.lr, check those records, or set train.on_nonfinite: skip_batch")


# --------------------------------------------------------------------------- signals

class StopSignals:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the next step boundary and stops.
    A second SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def requested(self, accelerator: Any) -> bool:
        """Whether any process got a stop signal (all processes must stop at the same step)."""
        flag = self.received is not None
        if accelerator.num_processes > 1:
            t = torch.tensor(float(flag), device=accelerator.device)
            flag = bool(accelerator.reduce(t, reduction="sum").item() > 0)
        return flag

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal"


# --------------------------------------------------------------------------- disk

def disk_warning(run_dir: Any, trainable: Sequence[torch.nn.Parameter], keep: int) -> Optional[str]:
    """A warning when the run dir's file system lacks room for ``keep`` + 1 checkpoints."""
    from .checkpoint import checkpoint_bytes

    weights = sum(p.numel() * 4 for p in trainable)  # checkpoints hold fp32 weights and moments
    return free_space_warning(run_dir, checkpoint_bytes(weights, keep), "the run's checkpoints")


def checkpoint_failed(step: int, ckpt_dir: Any, err: OSError, previous: Optional[Any]) -> CheckpointWriteError:
    prev = f"the previous checkpoint {previous} is intact: free space, then resume with --resume" if previous else \
        "no earlier checkpoint exists: free space and start again"
    return CheckpointWriteError(f"could not write the checkpoint of step {step} in {ckpt_dir}: {err.strerror or err}; {prev}")
