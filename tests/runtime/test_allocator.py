"""Freed large blocks are reused instead of faulted in afresh."""

from __future__ import annotations

import resource

import pytest
import torch

from seq2seq.runtime.allocator import retain_freed_memory


def _faults_of_repeated_allocations(count: int = 10, mib: int = 16) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        torch.empty(mib << 18).fill_(1.0)  # mib MiB of float32, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_repeated_large_allocations_stop_faulting():
    if not retain_freed_memory():
        pytest.skip("not glibc: mallopt is unavailable")
    # the first allocations still fault while freed blocks accumulate in the heap
    _faults_of_repeated_allocations(count=20)
    pages_of_one = (16 << 20) // resource.getpagesize()
    assert _faults_of_repeated_allocations() < pages_of_one // 4
