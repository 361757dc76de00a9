"""The hand-written GRU recurrence against PyTorch's own GRU."""

from __future__ import annotations

import torch
from torch import nn

from seq2seq.model.gru import bidirectional_gru, gru_recurrence


def _inputs(steps: int = 5, batch: int = 3, size: int = 4, features: int = 6, device="cpu"):
    torch.manual_seed(0)
    rnn = nn.GRU(features, size).double().to(device)
    x = torch.randn(steps, batch, features, dtype=torch.float64, device=device).requires_grad_()
    h0 = torch.randn(batch, size, dtype=torch.float64, device=device).requires_grad_()
    return rnn, x, h0


def _ours(rnn: nn.GRU, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    gates_x = nn.functional.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0).transpose(0, 1)
    return gru_recurrence(gates_x, h0, rnn.weight_hh_l0, rnn.bias_hh_l0).transpose(0, 1)


def test_states_and_gradients_match_nn_gru(device):
    rnn, x, h0 = _inputs(device=device)
    weights = torch.randn(
        5, 3, 4, dtype=torch.float64, device=device
    )  # a loss that weighs every state
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
    gates_x = nn.functional.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0).transpose(0, 1)
    gates_x = gates_x.detach().contiguous().requires_grad_()  # (N, T, 3H)
    w_hh = rnn.weight_hh_l0.detach().clone().requires_grad_()
    b_hh = rnn.bias_hh_l0.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(gru_recurrence, (gates_x, h0, w_hh, b_hh))


def test_bidirectional_gru_matches_nn_gru_on_packed_sequences(device):
    """States, final states and every gradient equal ``nn.GRU`` over the packed
    batch; padding positions come out zero whatever the input holds there."""
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, batch_first=True, bidirectional=True).double().to(device)
    lengths = torch.tensor([5, 1, 3, 5])
    options = {"dtype": torch.float64, "device": device}
    x = torch.randn(4, 5, 3, **options).requires_grad_()
    weights = (torch.randn(4, 5, 8, **options), torch.randn(4, 8, **options))
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, final = rnn(packed)
    theirs, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=5)
    their_final = torch.cat([final[0], final[1]], dim=-1)
    params = [x, *rnn.parameters()]
    loss = (theirs * weights[0]).sum() + (their_final * weights[1]).sum()
    expected = torch.autograd.grad(loss, params)
    ours, our_final = bidirectional_gru(x, lengths.to(device), rnn)
    loss = (ours * weights[0]).sum() + (our_final * weights[1]).sum()
    got = torch.autograd.grad(loss, params)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_final, their_final)
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, msg=f"gradient {index}")


def test_inference_runs_the_same_recurrence_without_a_graph():
    """Without gradients the recurrence skips what only the backward reads; the
    states must be bitwise those of the differentiable path, in both directions."""
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, batch_first=True, bidirectional=True)
    lengths = torch.tensor([5, 1, 3, 5])
    x = torch.randn(4, 5, 3, requires_grad=True)
    with_graph, final = bidirectional_gru(x, lengths, rnn)
    assert with_graph.requires_grad
    with torch.no_grad():
        without, final_without = bidirectional_gru(x, lengths, rnn)
    assert not without.requires_grad
    assert torch.equal(without, with_graph.detach())
    assert torch.equal(final_without, final.detach())
