"""Cross-entropy masked on padding, with optional label smoothing."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_cross_entropy(
    logits: Tensor, target: Tensor, *, pad_id: int, label_smoothing: float = 0.0
) -> tuple[Tensor, int]:
    """Summed token loss over real (non-pad) target positions, and their count.

    Why a sum and a count instead of a mean: the caller normalises per real
    target token across the whole batch, so padding never dilutes the loss and
    batches of different shapes are weighted by the tokens they really hold.
    The softmax runs in float32 even under bf16 autocast, where a bf16
    log-softmax over 8k classes loses visible precision.

    Args:
        logits: (B, T, V) unnormalised scores.
        target: (B, T) gold ids, ``pad_id`` on padding.
        pad_id: id ignored in the loss (no smoothing mass either).
        label_smoothing: epsilon of uniform label smoothing (Szegedy et al., 2016).

    Returns:
        (loss sum as a 0-dim tensor, number of real target tokens).
    """
    vocab = logits.size(-1)
    loss = F.cross_entropy(
        logits.reshape(-1, vocab).float(),
        target.reshape(-1),
        ignore_index=pad_id,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    return loss, int((target != pad_id).sum())
