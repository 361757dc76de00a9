"""Bahdanau's additive attention score through a sigmoid, with a hand-written backward.

The score is ``e = v^T tanh(k + q)`` for every (query, key) pair: the one
elementwise operation over a (B, T, S, A) tensor in a training step, so its cost
is the attention's cost. Two facts make it cheaper:

* ``tanh(u) = 2 sigmoid(2u) - 1``, so ``e = 2 v^T sigmoid(2k + 2q) - sum(v)``.
  The last term is the same for every key, and the softmax over keys ignores a
  constant shift, so the attention weights are exactly those of
  ``v^T tanh(k + q)`` with the same parameters. On CPU the reason is speed:
  PyTorch's vectorised ``tanh`` runs several times slower than ``sigmoid``.
* The caller passes ``2k`` and ``2q``: keys are doubled once per batch, so a
  search step, whose (N, S, A) sum is as large as the keys, makes no extra pass
  to double them.
* The backward reuses the saved sigmoid in place and applies ``v`` after the
  reductions over keys and queries, not to the whole (B, T, S, A) tensor.
  Autograd's version of the tanh form makes about twice as many passes over it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Upper bound on the elements of one additive-attention score tensor (B, t, S, A);
# longer targets are attended in chunks of steps so memory stays bounded.
CHUNK_ELEMENTS = 1 << 24


def _gates(keys: Tensor, queries: Tensor) -> Tensor:
    """(B, T, S, A) ``sigmoid(2k + 2q)`` of doubled keys and queries, every pair."""
    return torch.add(keys[:, None], queries[:, :, None]).sigmoid_()


class _AdditiveScores(torch.autograd.Function):
    """Shifted additive scores; saves the (B, T, S, A) sigmoid for the backward."""

    @staticmethod
    def forward(ctx: Any, keys: Tensor, queries: Tensor, v: Tensor) -> Tensor:
        gates = _gates(keys, queries)
        ctx.save_for_backward(gates, v)
        # A reduction, not a matmul: under bf16 a matmul here would build one
        # oneDNN primitive per batch shape during decoding, each costing memory.
        return (gates * v).sum(-1).mul_(2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # Reused in place below; autograd's version check makes a second backward
        # (retain_graph) raise instead of returning wrong gradients.
        gates, v = ctx.saved_tensors
        need_keys, need_queries, need_v = ctx.needs_input_grad
        grad_v = None
        if need_v:
            rows = gates.view(-1, gates.size(-1))
            grad_v = (grad.reshape(1, -1) @ rows)[0].mul_(2)
        if not (need_keys or need_queries):
            return None, None, grad_v
        # d e / d (2k or 2q) = 2 v * sigmoid * (1 - sigmoid); v comes after the sums.
        local = gates.addcmul_(gates, gates, value=-1).mul_(grad[..., None])
        scale = 2 * v
        grad_keys = local.sum(1).mul_(scale) if need_keys else None
        grad_queries = local.sum(2).mul_(scale) if need_queries else None
        return grad_keys, grad_queries, grad_v


def additive_scores(keys: Tensor, queries: Tensor, v: Tensor) -> Tensor:
    """Additive attention scores, shifted per query by a constant that the softmax
    over keys cancels: the weights equal ``softmax(v^T tanh(k + q))``.

    Long targets are scored in chunks of queries, so the (B, t, S, A) tensor of
    one chunk stays below ``CHUNK_ELEMENTS`` whatever the batch's length.

    Args:
        keys: (B, S, A) doubled key projections ``2 W_k h_s``.
        queries: (B, T, A) doubled query projections ``2 (W_q s_t + b)``.
        v: (A,) the scoring vector.

    Returns:
        (B, T, S) scores ``2 v^T sigmoid(keys + queries)``; differentiable in all three.
    """
    batch, steps, size = queries.shape
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * keys.size(1) * size))
    if chunk >= steps:
        return _scores(keys, queries, v)
    parts = [_scores(keys, queries[:, t : t + chunk], v) for t in range(0, steps, chunk)]
    return torch.cat(parts, dim=1)


def _scores(keys: Tensor, queries: Tensor, v: Tensor) -> Tensor:
    """``additive_scores`` of one chunk of queries."""
    if torch.is_grad_enabled() or keys.dtype != torch.float32:
        return _AdditiveScores.apply(keys, queries, v)
    # Without a graph in fp32 (search, validation), ``v`` is applied by MKL's
    # matrix-vector product: one pass over the sigmoid instead of a product and a
    # sum. Not in bf16: there a matmul would build a oneDNN kernel per batch shape.
    with torch.autocast(keys.device.type, enabled=False):
        return _gates(keys, queries).matmul(v).mul_(2)
