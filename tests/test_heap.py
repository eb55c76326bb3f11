"""models/heap.py: freed heap pages leave RSS once per step (glibc only)."""

from __future__ import annotations

import platform

import pytest
import torch

from tunelab.models.heap import _glibc, return_freed_pages


def _rss_anon_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(platform.system() != "Linux" or _glibc() is None, reason="glibc's malloc_trim only")
def test_return_freed_pages_releases_holes_in_the_heap():
    # 4096 blocks of 64 KiB (below glibc's smallest mmap threshold, so from the heap), touched,
    # then every other one freed: 128 MiB of holes that the heap keeps resident by itself.
    blocks = [torch.ones(16 * 1024) for _ in range(4096)]
    del blocks[::2]
    before = _rss_anon_mib()
    return_freed_pages()
    after = _rss_anon_mib()
    assert before - after > 64, (before, after)
    assert all(float(b[0]) == 1.0 for b in blocks[:8])  # the live blocks are untouched
    del blocks
    return_freed_pages()  # leave this process's RSS as the test found it
