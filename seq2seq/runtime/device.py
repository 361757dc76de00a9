"""Where tensors live and in which precision matmuls run: CPU or CUDA, fp32 or bf16."""

from __future__ import annotations

import torch


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
