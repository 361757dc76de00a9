"""The masked loss equals a hand computation over non-pad tokens only."""

from __future__ import annotations

import math

import pytest
import torch

from seq2seq.model.loss import masked_cross_entropy

PAD = 0


def test_masked_loss_equals_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    target = torch.tensor([[3, 4, 5, PAD], [2, PAD, PAD, PAD]])
    loss, n = masked_cross_entropy(logits, target, pad_id=PAD)
    log_probs = torch.log_softmax(logits, -1)
    by_hand = -sum(
        log_probs[b, t, target[b, t]].item()
        for b in range(2)
        for t in range(4)
        if target[b, t] != PAD
    )
    assert n == 4
    assert math.isclose(loss.item(), by_hand, rel_tol=1e-6)


def test_label_smoothing_by_hand_and_pad_ignored():
    torch.manual_seed(1)
    eps, vocab = 0.1, 6
    logits = torch.randn(1, 3, vocab)
    target = torch.tensor([[2, 5, PAD]])
    loss, n = masked_cross_entropy(logits, target, pad_id=PAD, label_smoothing=eps)
    log_probs = torch.log_softmax(logits, -1)
    by_hand = 0.0
    for t in range(2):
        nll = -log_probs[0, t, target[0, t]].item()
        uniform = -log_probs[0, t].mean().item()
        by_hand += (1 - eps) * nll + eps * uniform
    assert n == 2
    assert math.isclose(loss.item(), by_hand, rel_tol=1e-5)
    # changing the logits at the padded position changes nothing
    logits[0, 2] += 100
    assert torch.equal(
        masked_cross_entropy(logits, target, pad_id=PAD, label_smoothing=eps)[0], loss
    )


def test_gradient_equals_pytorch_cross_entropy():
    """The hand-written backward against autograd through PyTorch's own loss."""
    torch.manual_seed(2)
    target = torch.tensor([[2, 5, 1, PAD], [4, 3, PAD, PAD]])
    for eps in (0.0, 0.1):
        logits = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
        ours, _ = masked_cross_entropy(logits, target, pad_id=PAD, label_smoothing=eps)
        (grad_ours,) = torch.autograd.grad(2.5 * ours, logits)
        theirs = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 7),
            target.reshape(-1),
            ignore_index=PAD,
            reduction="sum",
            label_smoothing=eps,
        )
        (grad_theirs,) = torch.autograd.grad(2.5 * theirs, logits)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(grad_ours, grad_theirs)
        assert grad_ours[1, 2:].abs().sum() == 0  # padding gets no gradient


def test_a_second_backward_raises_instead_of_returning_wrong_gradients():
    """The backward turns its saved log-probabilities into the gradient in place."""
    logits = torch.randn(2, 3, 6, requires_grad=True)
    loss, _ = masked_cross_entropy(logits, torch.tensor([[1, 2, PAD], [3, 4, 5]]), pad_id=PAD)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
