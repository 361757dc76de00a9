"""One-layer GRUs over precomputed input gates, with a hand-written backward:
the decoder's recurrence and the encoder's two directions.

Why not ``nn.GRU`` for the decoder: it reads ``[y_{t-1}; c]`` at every step, and c is
the same for all steps of a sentence, so two thirds of the input projection
(``W_ih[:, E:] c``) need computing once per sentence, not once per step. The
fused ``nn.GRU`` only accepts the concatenated input, so it cannot skip that
work; this recurrence takes the input gates ready-made. Its backward also
computes the recurrent weight gradient with one large matmul over all steps
instead of one small matmul per step. For the encoder, ``bidirectional_gru``
says why.

The gate layout and equations are PyTorch's (r, z, n order):

    r = sigmoid(x_r + W_hr h + b_hr)
    z = sigmoid(x_z + W_hz h + b_hz)
    n = tanh(x_n + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

so an ``nn.GRU``'s parameters plug in unchanged (``x = W_ih input + b_ih``).
Every tensor must share one dtype: under bf16 autocast the caller casts the
weights, as ``nn.GRU`` under autocast does.

``encoder_recurrence`` and ``decoder_recurrence`` are the model's two entry points:
each runs its recurrence either here or through the ``nn.GRU`` module itself
(cuDNN's fused kernels on CUDA), as ``model.rnn_impl`` and the device choose
(``recurrence_impl``). Other cells and deeper stacks always run through the module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.config import Cell, RnnImpl

RnnState = Tensor | tuple[Tensor, Tensor]

# What ``model.rnn_impl=auto`` runs per device type. The hand-written recurrence
# wins on CPU; on CUDA it stays the default until ``scripts/gpu_check.sh`` has
# measured both there (docs/benchmarks.md holds the figures).
AUTO: dict[str, RnnImpl] = {"cpu": RnnImpl.handwritten, "cuda": RnnImpl.handwritten}


def gru_cell(
    gates_x: Tensor,
    gates_h: Tensor,
    hidden: Tensor,
    *,
    gates: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One GRU update from both gate projections: (r, z, n, new hidden).

    Why the buffers: the recurrence writes r | z | n straight into the slot it
    saves for the backward and the new state into its output, so a step is six
    operations with no copies; r and z share one add and one sigmoid.

    Args:
        gates_x: (..., N, 3H) input gates ``W_ih x + b_ih``.
        gates_h: (..., N, 3H) recurrent gates ``W_hh h + b_hh``.
        hidden: (..., N, H) the state before the step.
        gates: optional (..., N, 3H) buffer (may be strided) that receives r | z | n.
        out: optional (..., N, H) buffer for the new state.
    """
    size = hidden.size(-1)
    if gates is None:
        gates = torch.empty_like(gates_x)
    both = torch.add(gates_x[..., : 2 * size], gates_h[..., : 2 * size], out=gates[..., : 2 * size])
    reset, update = both.sigmoid_().chunk(2, dim=-1)
    candidate = torch.addcmul(
        gates_x[..., 2 * size :], reset, gates_h[..., 2 * size :], out=gates[..., 2 * size :]
    ).tanh_()
    return reset, update, candidate, torch.lerp(candidate, hidden, update, out=out)


class _Recurrence(torch.autograd.Function):
    """D independent GRUs (D = 2 for the two directions of an encoder) stepped
    together: one batched matmul per step for all of them. Batch-first, so the
    callers' (N, T, ...) tensors go in and come out without transposed copies.
    Forward keeps r, z, n and ``W_hn h + b_hn`` per step for the backward."""

    @staticmethod
    def forward(ctx: Any, gates_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        dirs, batch, steps, size = *gates_x.shape[:3], h0.size(-1)
        states = gates_x.new_empty(dirs, batch, steps + 1, size)
        states[:, :, 0] = h0
        saved = gates_x.new_empty(dirs, batch, steps, 4 * size)  # r | z | n | W_hn h + b_hn
        w_t, bias = w_hh.transpose(1, 2), b_hh[:, None]
        for t in range(steps):
            gates_h = torch.baddbmm(bias, states[:, :, t], w_t)
            slot = saved[:, :, t]
            gru_cell(
                gates_x[:, :, t],
                gates_h,
                states[:, :, t],
                gates=slot[..., : 3 * size],
                out=states[:, :, t + 1],
            )
            slot[..., 3 * size :] = gates_h[..., 2 * size :]
        ctx.save_for_backward(states, saved, w_hh)
        return states[:, :, 1:]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        states, saved, w_hh = ctx.saved_tensors
        dirs, batch, steps, size = grad_out.shape
        reset, update, candidate, h_n = saved.view(dirs, batch, steps, 4, size).unbind(3)
        # How each gate's pre-activation moves per unit of gradient on the new
        # state, for all steps at once; the loop then needs one product per step.
        stay = 1 - update
        d_n = stay * (1 - candidate * candidate)
        d_z = (states[:, :, :-1] - candidate) * update * stay
        d_r = d_n * h_n * reset * (1 - reset)
        # (D, N, T, 3, H): r | z | n, the latter as seen by W_hn h
        factors = torch.stack([d_r, d_z, d_n * reset], dim=3)
        grad_state = grad_out.new_empty(dirs, batch, steps, size)  # total, per new state
        grad_h_gates = grad_out.new_empty(dirs, batch, steps, 3 * size)
        grad_h = torch.zeros_like(states[:, :, 0])
        for t in range(steps - 1, -1, -1):
            grad = torch.add(grad_h, grad_out[:, :, t], out=grad_state[:, :, t])
            gates = grad_h_gates[:, :, t]
            torch.mul(factors[:, :, t], grad[:, :, None], out=gates.view(dirs, batch, 3, size))
            grad_h = torch.baddbmm(grad * update[:, :, t], gates, w_hh)
        # r and z see the same gradient as W_h h does; n sees it without r's factor.
        grad_x = torch.empty_like(grad_h_gates)
        grad_x[..., : 2 * size] = grad_h_gates[..., : 2 * size]
        torch.mul(grad_state, d_n, out=grad_x[..., 2 * size :])
        flat = grad_h_gates.view(dirs, -1, 3 * size)
        grad_w = flat.transpose(1, 2) @ states[:, :, :-1].reshape(dirs, -1, size)
        return grad_x, grad_h, grad_w, flat.sum(1)


def _run(gates_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """``_Recurrence``'s forward without a graph, (D, N, T, H): for inference.

    Why: the autograd version writes r, z, n and ``W_hn h`` of every step into a
    buffer the size of the whole sequence for its backward; when nothing will be
    differentiated, those copies are time and memory nothing reads. Here the gates
    go through one reused scratch buffer.
    """
    dirs, batch, steps, _ = gates_x.shape
    out = gates_x.new_empty(dirs, batch, steps, h0.size(-1))
    scratch = torch.empty_like(gates_x[:, :, 0])
    w_t, bias = w_hh.transpose(1, 2), b_hh[:, None]
    hidden = h0
    for t in range(steps):
        gates_h = torch.baddbmm(bias, hidden, w_t)
        *_, hidden = gru_cell(gates_x[:, :, t], gates_h, hidden, gates=scratch, out=out[:, :, t])
    return out


def _recurrence(gates_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """D GRUs over (D, N, T, 3H) input gates: (D, N, T, H), with a graph only if needed."""
    inputs = (gates_x, h0, w_hh, b_hh)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _Recurrence.apply(*inputs)
    return _run(*inputs)


def gru_recurrence(gates_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """Run the GRU over all steps; differentiable in every argument.

    Args:
        gates_x: (N, T, 3H) input gates ``W_ih x_t + b_ih`` for every step.
        h0: (N, H) the initial state.
        w_hh: (3H, H) and b_hh: (3H,) the recurrent weights (``nn.GRU`` layout).

    Returns:
        (N, T, H) the state after every step.
    """
    return _recurrence(gates_x[None], h0[None], w_hh[None], b_hh[None])[0]


def bidirectional_gru(x: Tensor, lengths: Tensor, rnn: nn.GRU) -> tuple[Tensor, Tensor]:
    """A one-layer bidirectional GRU over a padded batch, equal to ``nn.GRU`` on
    the packed sequences: padding never changes a sentence's states.

    Why not ``nn.GRU``: on CPU its packed path runs each direction's step as a
    dozen small autograd operations, so a training step spent longer in the
    encoder (a quarter of the decoder's FLOPs) than in the decoder's recurrence.
    Here the backward direction reads every sentence reversed within its length,
    so both directions run forward in time with their real tokens first, one
    batched matmul per step; states past a sentence's end are never read by its
    real positions, and are zeroed in the output.

    Args:
        x: (B, S, E) inputs, anything on padding.
        lengths: (B,) real lengths, all >= 1, on ``x``'s device.
        rnn: a one-layer bidirectional ``nn.GRU`` (batch-first or not), whose
            weights are used; its own forward is not called.

    Returns:
        states (B, S, 2h), ``[forward; backward]`` and zero on padding, and the
        final states ``[h_fwd_last; h_bwd_first]``, (B, 2h).
    """
    w_ih, b_ih, w_hh, b_hh = (
        torch.stack([getattr(rnn, name), getattr(rnn, f"{name}_reverse")])
        for name in ("weight_ih_l0", "bias_ih_l0", "weight_hh_l0", "bias_hh_l0")
    )
    batch, steps, size = x.size(0), x.size(1), rnn.hidden_size
    positions = torch.arange(steps, device=x.device)
    real = positions < lengths[:, None]  # (B, S)
    # Position s of the reversed sentence b is original position len_b - 1 - s: as a
    # row of the flattened (B * S) batch, so one row copy (index_select) of the
    # inputs reverses every sentence (cheaper than gathering the gates with an
    # expanded index), and one batched matmul gives each direction its input gates.
    reverse = torch.where(real, lengths[:, None] - 1 - positions, positions)
    rows = (torch.arange(batch, device=x.device)[:, None] * steps + reverse).view(-1)
    flat = x.reshape(batch * steps, -1)
    inputs = torch.stack([flat, flat.index_select(0, rows)])  # (2, B * S, E)
    gates_x = torch.baddbmm(b_ih[:, None], inputs, w_ih.transpose(1, 2))
    gates_x = gates_x.view(2, batch, steps, -1)
    dtype = gates_x.dtype  # bf16 under autocast: every tensor goes in it, as in nn.GRU
    h0 = gates_x.new_zeros(2, batch, size)
    out = _recurrence(gates_x, h0, w_hh.to(dtype), b_hh.to(dtype))  # (2, B, S, h)
    # Reversing within each length is its own inverse: the same rows restore the order.
    backward_states = out[1].reshape(batch * steps, size).index_select(0, rows)
    backward_states = backward_states.view(batch, steps, size)
    final = torch.cat(
        [out[0, torch.arange(batch, device=x.device), lengths - 1], backward_states[:, 0]], -1
    )
    states = torch.cat([out[0], backward_states], dim=-1) * real[..., None]
    return states, final


# ----------------------------------------------------------- the model's entry points


def rnn_module(
    cell: Cell,
    input_size: int,
    hidden_size: int,
    *,
    layers: int,
    dropout: float,
    bidirectional: bool = False,
) -> nn.RNNBase:
    """PyTorch's batch-first RNN module for ``cell``, with dropout between layers:
    the parameters every implementation reads."""
    classes: dict[Cell, Callable[..., nn.RNNBase]] = {
        Cell.gru: nn.GRU,
        Cell.lstm: nn.LSTM,
        Cell.rnn: nn.RNN,
    }
    return classes[cell](
        input_size,
        hidden_size,
        num_layers=layers,
        batch_first=True,
        bidirectional=bidirectional,
        dropout=dropout if layers > 1 else 0.0,
    )


def recurrence_impl(setting: RnnImpl | str, device: torch.device) -> RnnImpl:
    """The implementation that runs on ``device`` for ``model.rnn_impl=setting``."""
    impl = RnnImpl.parse(setting, "model.rnn_impl")
    if impl != RnnImpl.auto:
        return impl
    return AUTO.get(device.type, RnnImpl.handwritten)


def fusable(rnn: nn.RNNBase) -> bool:
    """Whether this module's recurrence can run here: a one-layer GRU."""
    return isinstance(rnn, nn.GRU) and rnn.num_layers == 1


def layer_weight(rnn: nn.RNNBase, name: str) -> Tensor:
    """A weight of the RNN's first layer by PyTorch's name (``weight_ih`` ...)."""
    return rnn.get_parameter(f"{name}_l0")


def encoder_recurrence(
    x: Tensor, lengths: Tensor, rnn: nn.RNNBase, *, impl: RnnImpl | str
) -> tuple[Tensor, Tensor]:
    """A bidirectional RNN over the padded batch ``x`` (B, S, E) with real ``lengths``
    (B,): states (B, S, H), zero on padding, and ``[h_fwd_last; h_bwd_first]`` of the
    top layer, (B, H). Padding never changes a sentence's states on either path."""
    if fusable(rnn) and recurrence_impl(impl, x.device) == RnnImpl.handwritten:
        return bidirectional_gru(x, lengths, rnn)  # type: ignore[arg-type]
    # The packed path needs the lengths on the CPU: one copy per batch.
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, final = rnn(packed)
    states, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
    h_n = final[0] if isinstance(final, tuple) else final  # (2L, B, H/2)
    return states, torch.cat([h_n[-2], h_n[-1]], dim=-1)


def context_gates(rnn: nn.RNNBase, context: Tensor) -> Tensor:
    """(B, 3H) the context vector's share of a one-layer GRU decoder's input gates,
    ``W_ih[:, E:] c + b_ih``, for an input ``[y; c]`` whose last H features are c.

    Why: c is the same at every step, so this product (two thirds of the GRU's
    input projection) is computed once per sentence instead of once per step.
    """
    weight = layer_weight(rnn, "weight_ih")[:, rnn.input_size - context.size(-1) :]
    return F.linear(context.to(weight.dtype), weight, layer_weight(rnn, "bias_ih"))


def decoder_recurrence(
    rnn: nn.RNNBase, emb: Tensor, context: Tensor, state: RnnState, *, impl: RnnImpl | str
) -> tuple[Tensor, RnnState]:
    """The decoder RNN over ``[y_{t-1}; c]`` for all T steps at once.

    Args:
        rnn: the decoder's batch-first RNN, input size E + H.
        emb: (B, T, E) previous-token embeddings.
        context: (B, H) the context vector c, the same at every step.
        state: the RNN's state before the first step, as ``nn.RNNBase`` takes it.

    Returns:
        (B, T, H) the top layer's state after every step, and the state after the last.
    """
    if fusable(rnn) and recurrence_impl(impl, emb.device) == RnnImpl.handwritten:
        hidden = state[0] if isinstance(state, tuple) else state
        outputs = _decoder_steps(rnn, emb, context_gates(rnn, context), hidden[0])
        return outputs, outputs[:, -1][None]
    rnn_in = torch.cat([emb, context[:, None, :].expand(-1, emb.size(1), -1).to(emb.dtype)], -1)
    outputs, new_state = rnn(rnn_in, state)
    return outputs, new_state


def _decoder_steps(rnn: nn.RNNBase, emb: Tensor, gates_c: Tensor, h0: Tensor) -> Tensor:
    """All T steps of the one-layer GRU here: (B, T, H).

    The input gates of every step come from one matmul over the embeddings plus
    c's share (``gates_c``), computed once per sentence. Under autocast every
    tensor goes in the matmul dtype, as ``nn.GRU`` would.
    """
    weight = layer_weight(rnn, "weight_ih")[:, : emb.size(-1)]
    gates_x = F.linear(emb, weight) + gates_c[:, None]  # W_ih[:, :E] emb + c's share
    dtype = gates_x.dtype
    return gru_recurrence(
        gates_x,
        h0.to(dtype),
        layer_weight(rnn, "weight_hh").to(dtype),
        layer_weight(rnn, "bias_hh").to(dtype),
    )
