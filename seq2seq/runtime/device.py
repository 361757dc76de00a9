"""Where tensors live and in which precision matmuls run: CPU or CUDA, fp32 or bf16."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def pick_device(name: str = "auto", *, local_rank: int = 0) -> torch.device:
    """``auto`` means CUDA when present, else CPU.

    Under torchrun each process of a machine takes its own GPU: ``auto`` and a bare
    ``cuda`` mean ``cuda:LOCAL_RANK`` there (``local_rank``); ``cuda:N`` is taken as given.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}; choose one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or auto")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to run under bf16 autocast (training, or search with decode.precision).

    ``auto`` picks bf16 where the hardware computes it natively (CUDA with
    bf16 support, or a CPU with AVX-512 BF16 or AMX), where its matmuls run
    several times faster than fp32; elsewhere bf16 would be emulated, so fp32 is
    used. Weights, optimiser state and the softmax stay in fp32 either way.
    """
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    native = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in native)


def wants_pinned(tensor: Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` should be copied into page-locked memory before going to
    ``device``: only from the CPU to CUDA, and only when it is not page-locked yet.

    Why: a copy from ordinary (pageable) memory to a GPU makes the host wait until
    it is done, whatever ``non_blocking`` says; from page-locked memory it is queued
    and the host goes on preparing the next step. Pinning needs CUDA, so nothing is
    pinned on a machine without it.
    """
    return device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned()


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``: values and dtype kept, the copy queued where it can be."""
    if wants_pinned(tensor, device):
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def batch_to_device(batch: T, device: torch.device) -> T:
    """A dataclass of tensors (a training batch) with every tensor field on ``device``."""
    fields: dict[str, Any] = {
        f.name: to_device(value, device)
        for f in dataclasses.fields(batch)  # type: ignore[arg-type]
        if isinstance(value := getattr(batch, f.name), Tensor)
    }
    return dataclasses.replace(batch, **fields)  # type: ignore[type-var]
