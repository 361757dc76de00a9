"""Cross-entropy masked on padding, with optional label smoothing.

One autograd function computes the label-smoothed loss and its gradient
directly: ``grad = w * (softmax(z) - (1 - eps) * onehot(y) - eps / V)`` with
``w`` the upstream gradient on real tokens and 0 on padding. PyTorch's
``cross_entropy`` with label smoothing and ``ignore_index`` builds the same
gradient from several (N, V) passes (the smoothing term's expanded sum, the
padding mask, the sum of both terms, then ``log_softmax``'s backward); here
the backward is two passes over the saved log-probabilities. With a vocabulary
of thousands of pieces the loss is the largest elementwise cost of a step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _SmoothedNLL(torch.autograd.Function):
    """Per-row label-smoothed NLL of (N, V) logits; 0 where ``real`` is False."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, real: Tensor, eps: float) -> Tensor:
        wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32
        log_probs = torch.log_softmax(logits.to(wide), dim=-1)
        picked = log_probs.gather(1, target[:, None])[:, 0]
        loss = -(1 - eps) * picked
        if eps > 0:
            loss = loss - (eps / log_probs.size(1)) * log_probs.sum(1)
        ctx.save_for_backward(log_probs, target, real)
        ctx.eps, ctx.logits_dtype = eps, logits.dtype
        return loss * real

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        log_probs, target, real = ctx.saved_tensors
        eps = ctx.eps
        weight = (grad_loss * real)[:, None]
        grad = log_probs.exp_()  # in place: a second backward raises (version check)
        if eps > 0:  # w * (p - eps / V) in one pass
            torch.addcmul(weight * (-eps / grad.size(1)), grad, weight, out=grad)
        else:
            grad.mul_(weight)
        grad.scatter_add_(1, target[:, None], weight * (eps - 1))
        return grad.to(ctx.logits_dtype), None, None, None


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
    real = (target != pad_id).reshape(-1)
    rows = smoothed_nll(logits.reshape(-1, vocab), target.reshape(-1), real, label_smoothing)
    return rows.sum(), int(real.sum())


def smoothed_nll(logits: Tensor, target: Tensor, real: Tensor, label_smoothing: float) -> Tensor:
    """Per-row label-smoothed NLL of (N, C) logits, 0 where ``real`` is False: (N,).

    The building block of ``masked_cross_entropy`` and of each level of
    ``seq2seq.model.softmax``'s two-level loss.
    """
    return _SmoothedNLL.apply(logits, target, real, label_smoothing)
