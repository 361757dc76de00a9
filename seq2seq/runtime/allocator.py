"""Keep freed large blocks in the process heap instead of returning them.

Why: glibc serves every allocation above its mmap threshold (128 KiB at
first, adapting up to 32 MiB) with a fresh ``mmap`` and unmaps it on free, so
each training step's large tensors (the (N, V) logits, log-probs and their
gradients, the attention scores) arrive as new pages the kernel must fault in
and zero, every step. Kept for reuse, they are faulted in once. The cost is
that the process holds on to memory it has freed, which a long-running
training process reuses anyway. Host memory only: on a GPU, CUDA's caching
allocators hold device and page-locked memory themselves, and this changes
neither.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(limit: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds to ``limit`` bytes.

    Returns whether the setting took; False where the C library is not glibc
    (macOS, musl) and nothing was changed.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
