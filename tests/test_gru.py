"""The hand-written GRU recurrence against PyTorch's own GRU."""

from __future__ import annotations

import torch
from torch import nn

from seq2seq.gru import gru_recurrence


def _inputs(steps: int = 5, batch: int = 3, size: int = 4, features: int = 6):
    torch.manual_seed(0)
    rnn = nn.GRU(features, size).double()
    x = torch.randn(steps, batch, features, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, size, dtype=torch.float64, requires_grad=True)
    return rnn, x, h0


def _ours(rnn: nn.GRU, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    gates_x = nn.functional.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0)
    return gru_recurrence(gates_x, h0, rnn.weight_hh_l0, rnn.bias_hh_l0)


def test_states_and_gradients_match_nn_gru():
    rnn, x, h0 = _inputs()
    weights = torch.randn(5, 3, 4, dtype=torch.float64)  # a loss that weighs every state
    theirs, _ = rnn(x, h0[None])
    expected = torch.autograd.grad((theirs * weights).sum(), [x, h0, *rnn.parameters()])
    ours = _ours(rnn, x, h0)
    got = torch.autograd.grad((ours * weights).sum(), [x, h0, *rnn.parameters()])
    torch.testing.assert_close(ours, theirs)
    for name, a, b in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, expected, strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_backward_passes_gradcheck():
    """Finite differences agree with the hand-written backward in every input."""
    rnn, x, h0 = _inputs(steps=3, batch=2, size=3, features=2)
    gates_x = nn.functional.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0).detach().requires_grad_()
    w_hh = rnn.weight_hh_l0.detach().clone().requires_grad_()
    b_hh = rnn.bias_hh_l0.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(gru_recurrence, (gates_x, h0, w_hh, b_hh))
