"""A trained `Seq2Seq` frozen for search: the decoder step with every product that
depends only on the weights, or only on the source, computed ahead.

Why an object of its own: search runs the decoder one step at a time with weights that
do not change while it runs. Then each target token's share of the GRU's input gates
and of the deep output is one row of a table computed once for the whole vocabulary
(`token_table`), and per sentence the context vector's share of the input gates and
each encoder state's share of the deep output are computed once (`SearchEncoding`).
The training modules keep no caches: an inference object reads the weights as they are
when it is built, so whoever changes them builds a new one (the translator builds one
per model; validation during training builds a fresh translator each time).

A step computes `Seq2Seq.decode_step`'s function (a test pins the two together); its
scores are `seq2seq.model.softmax`'s `TwoLevelScores` or `FullScores`, which search ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from seq2seq.config import AttentionKind
from seq2seq.model.gru import gru_cell
from seq2seq.model.model import Decoder, DecoderState, EncoderOutput, Seq2Seq
from seq2seq.model.softmax import FullScores, TwoLevelScores

__all__ = ["GRUInference", "Inference", "RNNInference", "SearchEncoding", "build", "token_table"]


def build(model: Seq2Seq) -> GRUInference | RNNInference:
    """Search's view of ``model`` (in eval mode): the precomputed step for a one-layer
    GRU decoder, the model's own step otherwise."""
    if model.training:
        raise ValueError("search needs the model in eval mode (dropout off): call model.eval()")
    return GRUInference(model) if model.decoder.fused_gru else RNNInference(model)


def scores(decoder: Decoder, hidden: Tensor) -> TwoLevelScores | FullScores:
    """Search's next-token scores of deep-output vectors (N, E)."""
    if decoder.tail is None:
        return FullScores(hidden, decoder.generator)
    return TwoLevelScores(hidden, decoder.generator, decoder.tail, decoder.softmax_head)


class RNNInference:
    """Any decoder (LSTM, plain RNN, several layers), stepped through `Decoder.features`."""

    def __init__(self, model: Seq2Seq) -> None:
        self.model = model

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        """The model's encoder output for ``src`` (B, S) with ``src_lengths`` (B,)."""
        return self.model.encode(src, src_lengths)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        return self.model.init_state(enc)

    def step(
        self, prev_tokens: Tensor, state: DecoderState, enc: EncoderOutput
    ) -> tuple[TwoLevelScores | FullScores, DecoderState, Tensor]:
        """One step from ``prev_tokens`` (N,): scores, new state, attention (N, S)."""
        hidden, state, weights = self.model.decoder.features(prev_tokens[:, None], state, enc)
        return scores(self.model.decoder, hidden[:, 0]), state, weights[:, 0]


@dataclass(frozen=True)
class SearchEncoding:
    """The encoder output with what every step of a one-layer GRU decoder reads of it.

    Attributes:
        source: the model's encoder output, B rows.
        context_gates: (B, 3H) c's share of the GRU's input gates, bias included.
        values: (B, S, E) each encoder state's share of the deep output,
            ``W_o[:, H:2H] h_s`` (c's, (B, 1, E), without attention). A read-out is a
            weighted sum of states, so a step's read-out comes out already projected:
            E wide instead of H, and that share of the deep output's product is gone.
    """

    source: EncoderOutput
    context_gates: Tensor
    values: Tensor

    def select(self, index: Tensor) -> SearchEncoding:
        """Rows picked by ``index`` (e.g. each sentence repeated per beam)."""
        return SearchEncoding(
            self.source.select(index),
            self.context_gates.index_select(0, index),
            self.values.index_select(0, index),
        )


def token_table(decoder: Decoder) -> Tensor:
    """(V, 3H + E) each target token's share of the GRU's input gates (``W_ih[:, :E] y``)
    and of the deep output (``W_o[:, 2H:] y + b_o``), in float32.

    Why: a step's previous token is one of V, so these products are computed once for
    the whole vocabulary and gathered per step.
    """
    emb_size, hidden_size = decoder.embed.embedding_dim, decoder.rnn.hidden_size
    device = decoder.embed.weight.device.type
    with torch.no_grad(), torch.autocast(device, enabled=False):
        weight = torch.cat(
            [
                decoder.layer_weight("weight_ih")[:, :emb_size],
                decoder.deep_output.weight[:, 2 * hidden_size :],
            ]
        )
        bias = torch.cat([weight.new_zeros(3 * hidden_size), decoder.deep_output.bias])
        return torch.addmm(bias, decoder.embed.weight, weight.t())


class GRUInference:
    """A one-layer GRU decoder's step with the token-only and source-only products read
    from precomputed tensors: the same function as `Decoder.features` for one step."""

    def __init__(self, model: Seq2Seq) -> None:
        self.model = model
        self.decoder = model.decoder
        self.table = token_table(model.decoder)
        self.weight_hh = model.decoder.layer_weight("weight_hh")
        self.bias_hh = model.decoder.layer_weight("bias_hh")

    def encode(self, src: Tensor, src_lengths: Tensor) -> SearchEncoding:
        """Encode ``src`` (B, S) with ``src_lengths`` (B,), once per batch."""
        enc = self.model.encode(src, src_lengths)
        hidden = self.decoder.rnn.hidden_size
        weight = self.decoder.deep_output.weight[:, hidden : 2 * hidden]
        none = self.decoder.attention.kind == AttentionKind.none
        source = enc.context[:, None] if none else enc.states
        values = F.linear(source, weight.to(source.dtype))
        return SearchEncoding(enc, self.decoder.context_gates(enc.context), values)

    def init_state(self, enc: SearchEncoding) -> DecoderState:
        return self.model.init_state(enc.source)

    def step(
        self, prev_tokens: Tensor, state: DecoderState, enc: SearchEncoding
    ) -> tuple[TwoLevelScores | FullScores, DecoderState, Tensor]:
        """One step from ``prev_tokens`` (N,): scores, new state, attention (N, S)."""
        decoder = self.decoder
        by_token = self.table.index_select(0, prev_tokens)  # (N, 3H + E)
        gate_size = 3 * decoder.rnn.hidden_size
        gates = by_token[:, :gate_size].to(enc.context_gates.dtype) + enc.context_gates
        hidden = state.hidden[0]
        gates_h = F.linear(hidden, self.weight_hh, self.bias_hh)
        *_, new_hidden = gru_cell(gates, gates_h, hidden)
        readout, weights = decoder.attention(new_hidden[:, None], enc.source, enc.values)
        # The deep output's three shares: the state's (here), the read-out's (already
        # projected: ``enc.values``) and the previous token's with the bias (the table).
        weight = decoder.deep_output.weight[:, : new_hidden.size(-1)]
        out = torch.addmm(by_token[:, gate_size:].to(new_hidden.dtype), new_hidden, weight.t())
        out = torch.tanh(out.add_(readout[:, 0].to(out.dtype)))
        return scores(decoder, out), DecoderState(new_hidden[None]), weights[:, 0]


Inference = GRUInference | RNNInference
