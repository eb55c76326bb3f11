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
        libc.malloc_trim(0)
