"""Linear maps with their weights packed once for oneDNN: search's matmuls on CPU.

Why: a search step multiplies a few to a few hundred rows by the same weights
thousands of times. MKL's ``addmm`` re-lays the weight out on every call, which
dominates when rows are few: scoring the 6,000 tail pieces of 6 rows took
1.2-1.6 ms on a Zen 3 core, against 0.43 ms with the weight packed once for
oneDNN (``torch.ops.mkldnn``, the kernels behind PyTorch's own CPU inference
fusions); at 64 rows the two tie for most of the step's shapes.

A second reason: with a packed weight a row's result is bitwise the same
whatever the other rows and the thread count, which MKL's ``addmm`` does not
promise (its scores of a row shifted in the last bits with the batch size on
the same shapes). Search relies on that for outputs that never depend on the
batch.

The packed form is used only where it applies (CPU, float32, no autocast);
elsewhere `Packed` is a plain ``F.linear`` over the same weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Packed"]

# oneDNN picks a weight layout for a typical row count; any count works with it.
_ROWS_HINT = 64


def _can_pack(weight: Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Packed:
    """``x -> x W^T + b`` for (N, in) rows, with ``W`` packed once when it can be.

    Holds a detached copy of the weight's values as they were: build a new one
    after the weights change.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self._packed: Tensor | None = None
        if _can_pack(self.weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(
                self.weight.contiguous(), _ROWS_HINT
            )

    @property
    def out_features(self) -> int:
        return self.weight.size(0)

    def __call__(self, x: Tensor) -> Tensor:
        """(N, in) -> (N, out)."""
        if self._packed is None or x.dtype != torch.float32 or _cpu_autocast_on():
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def _cpu_autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()
