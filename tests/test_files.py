"""The one atomic writer: all or nothing, no temp left behind, permissions from the umask."""

from __future__ import annotations

import os
import stat

import pytest

from tunelab.files import atomic_dir, atomic_write_jsonl, atomic_write_text


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_text_replaces_whole_and_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a" / "f.txt", "one")
        assert p.read_text() == "one" and _mode(p) == 0o644
        atomic_write_text(p, "two")
        assert p.read_text() == "two"
        d = atomic_dir(tmp_path / "out", lambda t: (t / "w").write_text("x"))
        assert _mode(d) == 0o755 and _mode(d / "w") == 0o644
    finally:
        os.umask(old)
    assert sorted(x.name for x in (tmp_path / "a").iterdir()) == ["f.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = atomic_write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])

    class Boom:
        def __iter__(self):
            yield {"a": 2}
            raise KeyboardInterrupt  # Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write_jsonl(p, Boom())
    assert p.read_text() == '{"a": 1}\n'
    assert [x.name for x in tmp_path.iterdir()] == ["rows.jsonl"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    final = atomic_dir(tmp_path / "adapter", lambda t: (t / "w").write_text("v1"))

    def broken(t):
        (t / "w").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_dir(final, broken)
    assert (final / "w").read_text() == "v1"
    assert [x.name for x in tmp_path.iterdir()] == ["adapter"]
