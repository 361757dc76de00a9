"""Moving training batches to their device: values and dtypes kept, page-locked
copies only on the way from the CPU to CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from seq2seq.data.batching import collate
from seq2seq.runtime.device import batch_to_device, to_device, wants_pinned


@dataclass(frozen=True)
class Mixed:
    ids: torch.Tensor
    weights: torch.Tensor
    name: str


def _no_pinning(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("pin_memory was called")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)


def test_a_training_batch_keeps_its_values_and_dtypes(device: torch.device) -> None:
    batch = collate([([5, 6, 7], [8, 9]), ([5], [8, 9, 10, 11])])
    moved = batch_to_device(batch, device)
    assert type(moved) is type(batch)
    for name in ("src", "src_lengths", "tgt_in", "tgt_out"):
        before, after = getattr(batch, name), getattr(moved, name)
        assert after.device.type == device.type
        assert after.dtype == before.dtype
        assert torch.equal(after.cpu(), before)
    assert moved.n_tokens == batch.n_tokens


def test_fields_that_are_not_tensors_stay_as_they_are() -> None:
    mixed = Mixed(torch.arange(4), torch.rand(4, dtype=torch.float64), "x")
    moved = batch_to_device(mixed, torch.device("cpu"))
    assert moved.name == "x"
    assert moved.weights.dtype == torch.float64
    assert torch.equal(moved.ids, mixed.ids)


def test_nothing_is_pinned_on_the_way_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_pinning(monkeypatch)
    batch = collate([([5, 6], [8])])
    assert torch.equal(batch_to_device(batch, torch.device("cpu")).src, batch.src)
    assert torch.equal(to_device(torch.ones(3), torch.device("cpu")), torch.ones(3))


def test_only_a_cpu_tensor_bound_for_cuda_is_pinned() -> None:
    cpu_tensor = torch.zeros(2)
    assert wants_pinned(cpu_tensor, torch.device("cuda"))
    assert wants_pinned(cpu_tensor, torch.device("cuda", 1))
    assert not wants_pinned(cpu_tensor, torch.device("cpu"))
    assert not wants_pinned(torch.zeros(2, device="meta"), torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_a_pinned_tensor_is_not_pinned_again() -> None:
    pinned = torch.zeros(2).pin_memory()
    assert not wants_pinned(pinned, torch.device("cuda"))
    moved = to_device(pinned, torch.device("cuda"))
    assert torch.equal(moved.cpu(), pinned)
