"""Atomic output: every file and folder tunelab writes goes through here.

A writer puts its bytes in a temp file (or folder) next to the target, flushes and fsyncs it,
renames it into place with ``os.replace`` (atomic on POSIX within one file system) and fsyncs
the parent folder so the rename itself survives a crash. On any error, Ctrl-C included, the
temp path is removed and the target is left as it was: a reader sees the old version or the
new one, never half of one.

Permissions follow the umask, like any other tool's output: ``mkstemp``/``mkdtemp`` create
0600/0700 paths, which would make a merged model or a report unreadable to a serving process
or a colleague, so temp paths are chmod-ed to ``0666 & ~umask`` (files) and ``0777 & ~umask``
(folders) before the rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once (not thread-safe, but every
    # call sets the same value back)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every folder, deepest first, and give each the
    umask's permissions: some writers (safetensors) create their files 0600 whatever the umask."""
    mask = _umask()
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            os.chmod(p, 0o666 & ~mask)
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(dirpath, 0o777 & ~mask)
        _fsync_dir(Path(dirpath))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync the folder)."""
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` (a writer that wants a path, e.g. a GGUF writer), then fsync
    and rename the file to ``path``; the temp file is removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """One JSON value per line, written atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, fsync what it wrote, then rename tmp_dir to ``final``.

    An older ``final`` is moved aside first and removed only once the new one is in place, so
    at every moment ``final`` is either the old complete folder or the new complete folder
    (between the two renames it is briefly absent; a reader retries or sees the old one).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def free_space_warning(path: str | os.PathLike, need_bytes: int, what: str) -> Optional[str]:
    """A one-line warning when the file system holding ``path`` has less than ``need_bytes``
    free (checked before writing, so a run does not find out hours in); None when it has room."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if free >= need_bytes:
        return None
    mb = 1024 * 1024
    return (f"{p} has {free / mb:.1f} MB free but {what} need about {need_bytes / mb:.1f} MB; "
            f"free some space or lower train.keep_checkpoints, else a checkpoint write will fail")
