"""The runtime layer: what every other layer may lean on and none of them owns.

Device and bf16 choice, the torchrun world and its collectives, the allocator
setting that keeps training's memory flat, core counting, and the file-system
policy (outputs never clobber inputs; every file and directory is written beside
its target and renamed into place). It imports nothing else from the package
but ``seq2seq.config``.
"""

from __future__ import annotations

import os


def cores() -> int:
    """CPUs this process may run on: the affinity mask where the OS has one (a
    container or ``taskset`` may allow fewer than the machine has), else all."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1
