"""A one-layer GRU over precomputed input gates, with a hand-written backward.

Why not ``nn.GRU``: the decoder reads ``[y_{t-1}; c]`` at every step, and c is
the same for all steps of a sentence, so two thirds of the input projection
(``W_ih[:, E:] c``) need computing once per sentence, not once per step. The
fused ``nn.GRU`` only accepts the concatenated input, so it cannot skip that
work; this recurrence takes the input gates ready-made. Its backward also
computes the recurrent weight gradient with one large matmul over all steps
instead of one small matmul per step.

The gate layout and equations are PyTorch's (r, z, n order):

    r = sigmoid(x_r + W_hr h + b_hr)
    z = sigmoid(x_z + W_hz h + b_hz)
    n = tanh(x_n + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

so an ``nn.GRU``'s parameters plug in unchanged (``x = W_ih input + b_ih``).
Every tensor must share one dtype: under bf16 autocast the caller casts the
weights, as ``nn.GRU`` under autocast does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def gru_cell(gates_x: Tensor, gates_h: Tensor, hidden: Tensor) -> tuple[Tensor, ...]:
    """One GRU update from both gate projections: (r, z, n, new hidden).

    Args:
        gates_x: (N, 3H) input gates ``W_ih x + b_ih``.
        gates_h: (N, 3H) recurrent gates ``W_hh h + b_hh``.
        hidden: (N, H) the state before the step.
    """
    in_r, in_z, in_n = gates_x.chunk(3, dim=-1)
    h_r, h_z, h_n = gates_h.chunk(3, dim=-1)
    reset = torch.sigmoid(in_r + h_r)
    update = torch.sigmoid(in_z + h_z)
    candidate = torch.tanh(torch.addcmul(in_n, reset, h_n))
    return reset, update, candidate, torch.lerp(candidate, hidden, update)


class _Recurrence(torch.autograd.Function):
    """Forward keeps r, z, n and ``W_hn h + b_hn`` per step for the backward."""

    @staticmethod
    def forward(ctx: Any, gates_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        steps, (batch, size) = gates_x.size(0), h0.shape
        states = gates_x.new_empty(steps + 1, batch, size)
        states[0] = h0
        saved = gates_x.new_empty(steps, batch, 4 * size)  # r | z | n | W_hn h + b_hn
        w_t = w_hh.t()
        for t in range(steps):
            gates_h = torch.addmm(b_hh, states[t], w_t)
            reset, update, candidate, states[t + 1] = gru_cell(gates_x[t], gates_h, states[t])
            torch.cat([reset, update, candidate, gates_h[:, 2 * size :]], dim=-1, out=saved[t])
        ctx.save_for_backward(states, saved, w_hh)
        return states[1:]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        states, saved, w_hh = ctx.saved_tensors
        steps, size = grad_out.size(0), states.size(-1)
        grad_x = grad_out.new_empty(steps, grad_out.size(1), 3 * size)
        grad_h_gates = torch.empty_like(grad_x)
        grad_h = torch.zeros_like(states[0])
        for t in range(steps - 1, -1, -1):
            grad_h = grad_h + grad_out[t]
            reset, update, candidate, h_n = saved[t].split(size, dim=-1)
            d_n = grad_h * (1 - update) * (1 - candidate * candidate)
            d_z = grad_h * (states[t] - candidate) * update * (1 - update)
            d_r = d_n * h_n * reset * (1 - reset)
            torch.cat([d_r, d_z, d_n], dim=-1, out=grad_x[t])
            torch.cat([d_r, d_z, d_n * reset], dim=-1, out=grad_h_gates[t])
            grad_h = torch.addmm(grad_h * update, grad_h_gates[t], w_hh)
        flat = grad_h_gates.view(-1, 3 * size)
        grad_w = flat.t() @ states[:-1].reshape(-1, size)
        return grad_x, grad_h, grad_w, flat.sum(0)


def gru_recurrence(gates_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """Run the GRU over all steps; differentiable in every argument.

    Args:
        gates_x: (T, N, 3H) input gates ``W_ih x_t + b_ih`` for every step.
        h0: (N, H) the initial state.
        w_hh: (3H, H) and b_hh: (3H,) the recurrent weights (``nn.GRU`` layout).

    Returns:
        (T, N, H) the state after every step.
    """
    return _Recurrence.apply(gates_x.contiguous(), h0.contiguous(), w_hh, b_hh)
