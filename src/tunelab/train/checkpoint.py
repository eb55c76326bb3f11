"""Atomic, resumable checkpoints, and the trained result (adapter or model).

A checkpoint is a folder ``checkpoints/step-000120`` holding the trainable weights
(safetensors), optimizer and scheduler state, RNG states and the loop position. It is written
to a temp folder and renamed, so a crash leaves either the whole checkpoint or none.
Non-weight state is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_dir


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler: Any, loop_state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step``: the full trainable ``weights`` (every process's share gathered,
    see train/distributed.py), the full ``optimizer_state``, scheduler, RNG and loop position."""
    final = Path(ckpt_dir) / f"step-{step:07d}"

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=1))

    atomic_dir(final, write)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        # renamed first: a kill mid-removal leaves a hidden leftover, never a listed half checkpoint
        doomed = old.with_name(f".{old.name}.old-{os.getpid()}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    d = Path(ckpt_dir)
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists())


ANY_RUN = object()


def checkpoint_run_id(path: Path) -> Optional[str]:
    try:
        return json.loads((Path(path) / "state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def latest_checkpoint(ckpt_dir: Path, run_id: Any = ANY_RUN) -> Optional[Path]:
    """The newest complete checkpoint; with ``run_id``, the newest one that run wrote (a
    checkpoint of another run in the same folder is never picked). Partial writes live in
    hidden temp folders until their rename, so they are never listed."""
    cks = list_checkpoints(ckpt_dir)
    if run_id is not ANY_RUN:
        cks = [c for c in cks if checkpoint_run_id(c) == run_id]
    return cks[-1] if cks else None


def checkpoint_bytes(weights_bytes: int, keep: int) -> int:
    """Disk a run's checkpoints need: weights + AdamW's two moments, for ``keep`` + 1 at once
    (the next one is written before the oldest is removed)."""
    return 3 * weights_bytes * (max(keep, 1) + 1)


class PickleRefused(ValueError):
    """A file that only pickle can read; refused unless the user allows pickle."""


def load_pt(path: Path, allow_pickle: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only. A file that needs
    pickle (arbitrary objects, so arbitrary code) is refused unless ``allow_pickle``."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise PickleRefused(f"{path}: needs pickle to load ({str(e).splitlines()[0][:120]}); pickle can run arbitrary code. "
                                f"Refused; pass --allow-pickle only if you trust this file") from None
        return torch.load(path, weights_only=False)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    load_optimizer: Optional[Callable[[dict], None]] = None, allow_pickle: bool = False) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the loop state. ``load_optimizer``
    replaces ``optimizer.load_state_dict`` (FSDP scatters a full state to the shards)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint has parameters the model lacks ({missing[:3]}...); was the config changed?")
    # the other direction too: a trainable parameter the checkpoint lacks would silently
    # keep its fresh initialisation (e.g. lora.targets widened between the runs)
    absent = [k for k, p in params.items() if p.requires_grad and k not in weights]
    if absent:
        raise ValueError(f"{path}: the model has trainable parameters the checkpoint lacks ({absent[:3]}...); was the config changed?")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    (load_optimizer or optimizer.load_state_dict)(load_pt(path / "optimizer.pt", allow_pickle))
    scheduler.load_state_dict(load_pt(path / "scheduler.pt", allow_pickle))
    set_rng_state(load_pt(path / "rng.pt", allow_pickle))
    return json.loads((path / "state.json").read_text())


def save_trained(model: torch.nn.Module, tokenizer: Any, method: str, run_dir: Path,
                 state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write the trained result atomically: ``run_dir/adapter`` (lora, qlora: the peft adapter)
    or ``run_dir/model`` (full: the whole model), with the tokenizer, in safetensors.
    ``state_dict``: the gathered weights when the model's own are shards (FSDP)."""
    target = Path(run_dir) / ("model" if method == "full" else "adapter")

    def write(tmp: Path) -> None:
        kw = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(tmp, safe_serialization=True, **kw)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(target, write)
