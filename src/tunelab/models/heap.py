"""Keep loading's transient host copies from staying resident after they are freed (glibc only).

Loading builds short-lived host tensors: each weight cast from its stored dtype (the embedded
model is stored in fp32) before it is kept or quantized. glibc serves blocks above a *dynamic*
mmap threshold from the heap once a large mmapped block has been freed (mallopt(3),
M_MMAP_THRESHOLD: the threshold rises up to 32 MiB), and with the quantizer's threads
interleaving small kept allocations among large freed ones the heap fragments and is not given
back. Measured here (QLoRA load of the embedded 135M, 2 cores, glibc 2.36): peak RSS
1.08-1.47 GiB over runs with the default policy, 1.05-1.07 GiB with a fixed 1 MiB threshold.

During a load the threshold is fixed at 1 MiB (large blocks are mmapped, so freeing returns them
to the OS); afterwards it is fixed at glibc's own dynamic ceiling (32 MiB) and the heap trimmed,
which is where the dynamic policy settles in training (tokens/s measured equal: 204.8 vs
206.7 tokens/s, benchmarks/train_speed.py --systems tunelab --steps 8). Leaving it at 1 MiB in
training would page-fault every step's activations in fresh (sys time 6 s -> 33 s, 12% slower).
In training the heap still creeps: each step frees and reallocates activations of other sizes,
and freed pages in the middle of the heap stay resident. :func:`return_freed_pages` (glibc's
``malloc_trim(0)``, which also releases free pages inside the heap) once per optimizer step
stops it: the benchmark's 32 steps (``benchmarks/train_speed.py``, bf16, Intel Xeon with AMX)
peaked at 3.37-3.48 GiB RSS without it, climbing 1.4 -> 3.0 GiB over the run, and at 2.83-2.88
GiB with it, at no measured cost in speed (141.6 s against 169.4 s of training in one pair).

Elsewhere than glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from typing import Any, Iterator, Optional

M_MMAP_THRESHOLD = -3  # <malloc.h>
LOAD_MMAP_THRESHOLD = 1 << 20
TRAIN_MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[Any]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def transient_blocks_return_to_os() -> Iterator[None]:
    """Around a model load: freed large blocks go back to the OS instead of fragmenting the heap."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, TRAIN_MMAP_THRESHOLD)
        return_freed_pages()


def return_freed_pages() -> None:
    """Give the heap's free pages back to the OS, top and middle (malloc_trim(0)); once per step."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
