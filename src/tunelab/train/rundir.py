"""The run directory: one run per folder, never silently overwritten, one process at a time.

- A folder that already holds a run (``run.json``, ``config.yaml``, ``metrics.jsonl``,
  ``checkpoints/``, ``adapter/`` or ``model/``) is refused unless the user says what to do:
  ``--resume`` (continue it), ``--overwrite`` (move it to ``<dir>.bak-YYYYmmdd-HHMMSS`` beside
  it, never deleting it) or another ``name``.
- ``--resume`` compares the saved ``config.yaml`` with the current config and refuses a change
  outside :data:`RESUME_MAY_CHANGE` with a diff.
- Each run gets an id (``run.json``); checkpoints record it and only the run's own are resumed.
- ``train.lock`` names the pid of the run using the folder; a second concurrent run is refused,
  a lock left by a dead process is taken over with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import Config, ConfigError, dump_yaml
from ..files import atomic_write_json
from .checkpoint import latest_checkpoint

RUN_FILE = "run.json"
LOCK_FILE = "train.lock"
RUN_MARKERS = (RUN_FILE, "config.yaml", "metrics.jsonl", "checkpoints", "adapter", "model")
# keys a resumed run may change: how long it runs and how often it evaluates, saves and logs
RESUME_MAY_CHANGE = (
    "name", "output_dir", "train.epochs", "train.max_steps", "train.eval_every", "train.save_every",
    "train.keep_checkpoints", "train.log_every", "train.eval_batch_size", "train.early_stopping.patience",
    "train.max_skipped_batches",
)


class RunDirError(ConfigError):
    """The run directory cannot be used as asked; the message says why and the ways on."""


@dataclass
class Run:
    """An open run directory: its id, the checkpoint to resume from, and the held lock."""

    dir: Path
    run_id: Optional[str]
    checkpoint: Optional[Path] = None
    backup: Optional[Path] = None  # where --overwrite moved the old run
    notes: list[str] = field(default_factory=list)  # warnings to show once the reporter exists
    lock: Optional["RunLock"] = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# --------------------------------------------------------------------------- lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _read_lock(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # empty or garbled: the writer died before finishing it


class RunLock:
    """``train.lock`` in the run dir, created with O_EXCL; holds this process's pid."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def acquire(cls, run_dir: Path, notes: list[str]) -> "RunLock":
        path = Path(run_dir) / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = _read_lock(path)
                busy = holder_alive(holder)
                if busy:
                    raise RunDirError(busy_message(run_dir, holder)) from None
                notes.append(f"took over the stale lock {path} of pid {holder.get('pid', '?')}, which is no longer running")
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, fh)
            return cls(path)
        raise RunDirError(f"{run_dir}: could not take the lock {path}; another run keeps creating it")

    def release(self) -> None:
        if _read_lock(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def holder_alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process: cannot tell, assume it runs
    return pid != os.getpid() and _pid_alive(pid)


def busy_message(run_dir: Path, holder: dict) -> str:
    return (f"{run_dir} is in use by another tunelab run (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}); "
            f"wait for it to end or stop it, or give this run another name (--set name=NEW)")


# --------------------------------------------------------------------------- refusing, backing up, resuming

def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / m).exists() for m in RUN_MARKERS)


def read_run_file(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a run from before run ids: its checkpoints carry none either


def read_run_id(run_dir: Path) -> Optional[str]:
    return read_run_file(run_dir).get("run_id")


def backup_path(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cand = run_dir.with_name(f"{run_dir.name}.bak-{stamp}")
    n = 1
    while cand.exists():
        cand = run_dir.with_name(f"{run_dir.name}.bak-{stamp}-{n}")
        n += 1
    return cand


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(saved_yaml: str, cfg: Config, saved_world: int = 1, world: int = 1) -> list[str]:
    """``key: saved -> current`` for every key that differs outside RESUME_MAY_CHANGE.
    ``train.grad_accum`` may change with the number of processes when the global batch
    (grad_accum x processes) stays the same: resuming on another number of GPUs."""
    saved = _flat(yaml.safe_load(saved_yaml) or {})
    now = _flat(yaml.safe_load(dump_yaml(cfg)))
    lines = []
    for k in sorted(set(saved) | set(now)):
        if k in RESUME_MAY_CHANGE or saved.get(k) == now.get(k):
            continue
        if k in saved and (now.get(k) is None or (k == "model.dtype" and now.get(k) == "auto")):
            continue  # the saved config.yaml is the resolved one: a derived default (null, auto) matches what it resolved to
        if k == "train.grad_accum" and isinstance(saved.get(k), int) and saved[k] * saved_world == now[k] * world:
            continue
        lines.append(f"  {k}: {saved.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}")
    return lines


def remove_leftovers(run_dir: Path) -> list[str]:
    """Temp files and folders a killed writer left (``.name.tmp-*``, ``.name.old-*``, ``.x.*.tmp``)."""
    gone = []
    for d in (run_dir, run_dir / "checkpoints"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def open_run(cfg: Config, resume: bool = False, overwrite: bool = False, world: int = 1) -> Run:
    """Claim ``cfg.run_dir`` for a new run, or for resuming the run in it (main process only)."""
    run_dir = cfg.run_dir
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory; set output_dir or name to another path")
    holder = _read_lock(run_dir / LOCK_FILE) if (run_dir / LOCK_FILE).exists() else {}
    if holder_alive(holder):
        raise RunDirError(busy_message(run_dir, holder))
    notes: list[str] = []
    if not resume:
        backup = None
        if holds_run(run_dir):
            if not overwrite:
                raise RunDirError(
                    f"{run_dir} already holds a run; continue it with --resume, move it aside to a timestamped backup "
                    f"with --overwrite, or give this run another name (--set name=NEW)")
            backup = backup_path(run_dir)
            os.replace(run_dir, backup)
            notes.append(f"--overwrite: the previous run was moved to {backup}")
        lock = RunLock.acquire(run_dir, notes)
        run_id = uuid.uuid4().hex[:12]
        atomic_write_json(run_dir / RUN_FILE, {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": world})
        return Run(run_dir, run_id, None, backup, notes, lock)

    if not holds_run(run_dir):
        raise FileNotFoundError(f"--resume: {run_dir} holds no run (no complete checkpoint in {run_dir / 'checkpoints'}); "
                                f"start it without --resume")
    lock = RunLock.acquire(run_dir, notes)
    try:
        saved, info = run_dir / "config.yaml", read_run_file(run_dir)
        if saved.exists():
            saved_world = info.get("world_size") if isinstance(info.get("world_size"), int) else 1
            diff = config_diff(saved.read_text(encoding="utf-8", errors="replace"), cfg, saved_world, world)
            if diff:
                raise RunDirError(
                    f"--resume: the config differs from the one {run_dir} was started with (only "
                    f"{', '.join(RESUME_MAY_CHANGE[2:])} may change):\n" + "\n".join(diff)
                    + "\nrestore those values, or start a new run (--overwrite or another name)")
        left = remove_leftovers(run_dir)
        if left:
            notes.append(f"removed {len(left)} partial write(s) of an interrupted run: {', '.join(sorted(left)[:3])}")
        run_id = info.get("run_id")
        if info and info.get("world_size") != world:
            atomic_write_json(run_dir / RUN_FILE, {**info, "world_size": world})
        ckpt = latest_checkpoint(run_dir / "checkpoints", run_id)
        if ckpt is None:
            notes.append(f"--resume: no complete checkpoint of this run in {run_dir / 'checkpoints'} yet; starting from step 0")
        return Run(run_dir, run_id, ckpt, None, notes, lock)
    except BaseException:
        lock.release()
        raise


def join_run(cfg: Config, resume: bool) -> Run:
    """A non-main process's view of the run the main process opened (after a barrier)."""
    run_id = read_run_id(cfg.run_dir)
    return Run(cfg.run_dir, run_id, latest_checkpoint(cfg.run_dir / "checkpoints", run_id) if resume else None)
