"""The RNN encoder-decoder, top to bottom: attention, encoder, decoder, Seq2Seq.

Architecture (all sizes from ``ModelConfig``):

* **Encoder**: embeddings -> multi-layer bidirectional RNN (GRU by default) over
  packed sequences, so padding never changes a sentence's states.
* **Context vector c** (Cho et al., 2014): ``c = tanh(W_c [h_fwd_last; h_bwd_first])``
  summarises the source. It initialises every decoder layer and is fed to the
  decoder at every step, next to the previous target embedding.
* **Decoder**: an RNN over ``[y_{t-1}; c]``, then attention with the new state
  ``s_t`` as the query (Luong et al., 2015 ordering) using Bahdanau's additive
  score (default), Luong's general score, or no attention (the pure
  context-vector model, where the attention read-out is ``c`` itself).
* **Deep output** (Pascanu et al., 2014): ``o_t = tanh(W_o [s_t; a_t; y_{t-1}])``
  of embedding size, then a vocabulary projection tied to the target embeddings:
  a full softmax, or with ``softmax_head`` a two-level one (``seq2seq.model.softmax``)
  that makes training's output layer cheaper.

Why the query is the state *after* the recurrence and there is no input
feeding: then the decoder RNN does not depend on attention, so teacher-forced
training runs it over the whole target sequence in one fused call and attends
for all steps in one batched operation, instead of a Python loop over steps.
``decode_step`` runs the same computation one step at a time; search runs it
through ``seq2seq.decoding.inference``, with the products that depend only on the weights
or only on the source computed ahead.

Shapes: B batch, S source length, T target length, E embedding size,
H hidden size (decoder; the encoder uses H/2 per direction), A attention size,
V vocabulary, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from seq2seq.config import AttentionKind, Cell, ModelConfig, RnnImpl
from seq2seq.model import gru, softmax
from seq2seq.model.additive import additive_scores
from seq2seq.model.dropout import Dropout, WordDropout
from seq2seq.model.loss import masked_cross_entropy


@dataclass(frozen=True)
class EncoderOutput:
    """What the decoder needs from the source; rows are sentences.

    Attributes:
        states: (B, S, H) encoder states, the attention values.
        keys: (B, S, A) or (B, S, H) key projections, computed once per batch
            (doubled for additive attention).
        mask: (B, S) True on real source positions.
        context: (B, H) the context vector c.
    """

    states: Tensor
    keys: Tensor
    mask: Tensor
    context: Tensor

    def select(self, index: Tensor) -> EncoderOutput:
        """Rows picked by ``index`` (e.g. each sentence repeated per beam)."""
        return EncoderOutput(*(getattr(self, f.name).index_select(0, index) for f in fields(self)))


@dataclass(frozen=True)
class DecoderState:
    """Recurrent state between decoding steps.

    Attributes:
        hidden: (L, N, H) hidden state per layer.
        cell: (L, N, H) LSTM memory cell, ``None`` for GRU and plain RNN.
    """

    hidden: Tensor
    cell: Tensor | None = None

    def select(self, index: Tensor) -> DecoderState:
        """Rows (dim 1) picked by ``index``: how beam search reorders hypotheses."""
        cell = None if self.cell is None else self.cell.index_select(1, index)
        return DecoderState(self.hidden.index_select(1, index), cell)

    def as_rnn_state(self) -> Tensor | tuple[Tensor, Tensor]:
        return self.hidden if self.cell is None else (self.hidden, self.cell)

    @staticmethod
    def from_rnn_state(state: Tensor | tuple[Tensor, Tensor]) -> DecoderState:
        if isinstance(state, tuple):
            return DecoderState(state[0], state[1])
        return DecoderState(state)


# ------------------------------------------------------------------------ attention


class Attention(nn.Module):
    """Scores decoder states against encoder keys; never looks at padding.

    ``bahdanau``: ``score = v^T tanh(W_k h_s + W_q s_t)`` (Bahdanau et al., 2015),
    computed through a sigmoid for speed (``seq2seq.model.additive`` says why).
    ``luong``: ``score = s_t^T W h_s`` ("general", Luong et al., 2015).
    ``none``: no scores; the read-out is the context vector c and the reported
    weights are uniform over the real source positions.
    """

    def __init__(self, kind: AttentionKind, *, hidden_size: int, attention_size: int) -> None:
        super().__init__()
        self.kind = AttentionKind.parse(kind, "model.attention")
        if self.kind == AttentionKind.bahdanau:
            self.key_proj = nn.Linear(hidden_size, attention_size, bias=False)
            self.query_proj = nn.Linear(hidden_size, attention_size)
            self.v = nn.Linear(attention_size, 1, bias=False)
        elif self.kind == AttentionKind.luong:
            self.key_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def keys(self, states: Tensor) -> Tensor:
        """(B, S, H) -> (B, S, A): the query-independent half, once per batch
        (doubled for ``bahdanau``: ``seq2seq.model.additive`` takes ``2 W_k h_s``)."""
        if self.kind == AttentionKind.none:
            return states
        keys = self.key_proj(states)
        return 2 * keys if self.kind == AttentionKind.bahdanau else keys

    def forward(
        self, query: Tensor, enc: EncoderOutput, values: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Attend with every query.

        Args:
            query: (B, T, H) decoder states.
            enc: the encoder output (keys, states, mask, c).
            values: (B, S, D) what to read out instead of the states (search reads
                them already projected); (B, 1, D) for ``none``.

        Returns:
            read-out (B, T, H) and weights (B, T, S), zero on padding.
        """
        mask = enc.mask[:, None, :]
        if self.kind == AttentionKind.none:
            weights = mask.to(query.dtype).expand(-1, query.size(1), -1)
            weights = weights / weights.sum(-1, keepdim=True)
            read = enc.context[:, None, :] if values is None else values
            return read.expand(-1, query.size(1), -1), weights
        scores = (
            self._additive(query, enc.keys)
            if self.kind == AttentionKind.bahdanau
            else self._general(query, enc.keys)
        )
        weights = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1)
        values = enc.states if values is None else values
        return torch.bmm(weights.to(values.dtype), values), weights

    @staticmethod
    def _general(query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(query, keys.transpose(1, 2))

    def _additive(self, query: Tensor, keys: Tensor) -> Tensor:
        q = 2 * self.query_proj(query)  # (B, T, A), doubled as the keys are
        return additive_scores(keys, q, self.v.weight[0].to(q.dtype))


# -------------------------------------------------------------------------- encoder


class Encoder(nn.Module):
    """Embeddings -> bidirectional RNN over packed sequences -> states and summary.

    A one-layer GRU runs through ``seq2seq.model.gru.bidirectional_gru`` or ``nn.GRU``
    as ``model.rnn_impl`` says (``seq2seq.model.gru.encoder_recurrence``): the same
    result from the same parameters.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, pad_id: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.embedding_size, padding_idx=pad_id)
        self.dropout = Dropout(cfg.dropout)
        self.word_dropout = WordDropout(cfg.word_dropout)
        cell = Cell.parse(cfg.cell, "model.cell")
        self.rnn = gru.rnn_module(
            cell,
            cfg.embedding_size,
            cfg.hidden_size // 2,
            layers=cfg.encoder_layers,
            dropout=cfg.dropout,
            bidirectional=True,
        )
        self.rnn_impl = RnnImpl.parse(cfg.rnn_impl, "model.rnn_impl")

    def forward(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a padded batch.

        Args:
            src: (B, S) token ids.
            lengths: (B,) real lengths, all >= 1.

        Returns:
            states (B, S, H), zero on padding, and the final states
            ``[h_fwd_last; h_bwd_first]`` of the top layer, (B, H).
        """
        x = self.dropout(self.word_dropout(self.embed(src)))
        return gru.encoder_recurrence(x, lengths, self.rnn, impl=self.rnn_impl)


# -------------------------------------------------------------------------- decoder


class Decoder(nn.Module):
    """RNN over ``[y_{t-1}; c]`` -> attention -> deep output -> vocabulary scores."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, pad_id: int) -> None:
        super().__init__()
        if not 0 <= cfg.softmax_head < vocab_size:
            raise ValueError(
                f"model.softmax_head={cfg.softmax_head} must be 0 (a full softmax) or fewer "
                f"than the {vocab_size} target pieces"
            )
        emb, hidden, self.layers = cfg.embedding_size, cfg.hidden_size, cfg.decoder_layers
        self.cell = Cell.parse(cfg.cell, "model.cell")
        self.embed = nn.Embedding(vocab_size, emb, padding_idx=pad_id)
        self.dropout = Dropout(cfg.dropout)
        self.word_dropout = WordDropout(cfg.word_dropout)
        self.rnn = gru.rnn_module(
            self.cell, emb + hidden, hidden, layers=self.layers, dropout=cfg.dropout
        )
        self.rnn_impl = RnnImpl.parse(cfg.rnn_impl, "model.rnn_impl")
        self.init_proj = nn.Linear(hidden, self.layers * hidden)
        self.attention = Attention(
            cfg.attention, hidden_size=hidden, attention_size=cfg.attention_size
        )
        self.deep_output = nn.Linear(2 * hidden + emb, emb)
        self.generator = nn.Linear(emb, vocab_size)
        if cfg.tie_embeddings:
            self.generator.weight = self.embed.weight
        self.softmax_head = cfg.softmax_head
        # The two-level softmax's tail class: its score sits next to the head's.
        self.tail = nn.Linear(emb, 1) if cfg.softmax_head else None

    @property
    def fused_gru(self) -> bool:
        """Whether the recurrence can be ``seq2seq.model.gru``'s, with c's share of the
        input gates computed once per sentence (a one-layer GRU)."""
        return gru.fusable(self.rnn)

    def layer_weight(self, name: str) -> Tensor:
        """A weight of the RNN's first layer by PyTorch's name (``weight_ih`` ...)."""
        return gru.layer_weight(self.rnn, name)

    def init_state(self, context: Tensor) -> DecoderState:
        """Every layer starts from ``tanh(W_init c)``; the LSTM cell from zeros."""
        batch, hidden = context.shape
        h0 = torch.tanh(self.init_proj(context)).view(batch, self.layers, hidden)
        h0 = h0.transpose(0, 1).contiguous()
        return DecoderState(h0, torch.zeros_like(h0) if self.cell == Cell.lstm else None)

    def features(
        self, prev_tokens: Tensor, state: DecoderState, enc: EncoderOutput
    ) -> tuple[Tensor, DecoderState, Tensor]:
        """T steps up to the deep output, all at once (teacher forcing; T = 1 for a
        single step).

        Args:
            prev_tokens: (B, T) previous target tokens (BOS first).
            state: recurrent state before the first of these steps.
            enc: encoder output for the same B rows.

        Returns:
            deep-output vectors (B, T, E) before the vocabulary projection, the state
            after the last step, attention (B, T, S).
        """
        emb = self.dropout(self.word_dropout(self.embed(prev_tokens)))  # (B, T, E)
        outputs, rnn_state = gru.decoder_recurrence(
            self.rnn, emb, enc.context, state.as_rnn_state(), impl=self.rnn_impl
        )  # (B, T, H)
        new_state = DecoderState.from_rnn_state(rnn_state)
        readout, weights = self.attention(outputs, enc)
        fused = torch.cat([outputs, readout.to(outputs.dtype), emb], dim=-1)
        hidden = self.dropout(torch.tanh(self.deep_output(fused)))  # (B, T, E)
        return hidden, new_state, weights

    def forward(
        self, prev_tokens: Tensor, state: DecoderState, enc: EncoderOutput
    ) -> tuple[Tensor, DecoderState, Tensor]:
        """``features`` then vocabulary scores (B, T, V): logits, or log-probs for the
        two-level softmax. Returns the scores, the new state and attention (B, T, S)."""
        hidden, new_state, weights = self.features(prev_tokens, state, enc)
        return self.scores(hidden), new_state, weights

    def scores(self, hidden: Tensor) -> Tensor:
        """Vocabulary scores (..., V) of deep-output vectors (..., E)."""
        if self.tail is None:
            return self.generator(hidden)
        return softmax.log_probs(hidden, self.generator, self.tail, self.softmax_head)

    def loss(
        self, hidden: Tensor, target: Tensor, *, pad_id: int, label_smoothing: float
    ) -> tuple[Tensor, int]:
        """Summed token loss of deep-output vectors (B, T, E) against gold (B, T),
        and the number of real tokens. The two-level softmax never scores the
        tail pieces of tokens whose target is in the head."""
        if self.tail is None:
            return masked_cross_entropy(
                self.generator(hidden), target, pad_id=pad_id, label_smoothing=label_smoothing
            )
        return softmax.loss(
            hidden,
            target,
            generator=self.generator,
            tail=self.tail,
            head=self.softmax_head,
            pad_id=pad_id,
            label_smoothing=label_smoothing,
        )

    def context_gates(self, context: Tensor) -> Tensor:
        """(B, 3H) c's share of a one-layer GRU's input gates (``gru.context_gates``)."""
        return gru.context_gates(self.rnn, context)


# ------------------------------------------------------------------------- seq2seq


class Seq2Seq(nn.Module):
    """Encoder, context vector and attentional decoder.

    ``forward`` and ``loss`` are the teacher-forced pass used in training;
    ``encode``, ``init_state`` and ``decode_step`` run it one step at a time.
    Both paths compute the same scores for the same inputs.
    """

    def __init__(self, cfg: ModelConfig, *, src_vocab: int, tgt_vocab: int, pad_id: int) -> None:
        super().__init__()
        if cfg.share_embeddings and src_vocab != tgt_vocab:
            raise ValueError(
                f"model.share_embeddings needs one vocabulary for both sides "
                f"(source {src_vocab}, target {tgt_vocab}); use tokenizer.joint=true"
            )
        if cfg.hidden_size % 2:
            raise ValueError(
                f"model.hidden_size={cfg.hidden_size} must be even (H/2 per direction)"
            )
        self.pad_id = pad_id
        self.encoder = Encoder(cfg, src_vocab, pad_id=pad_id)
        self.bridge = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.decoder = Decoder(cfg, tgt_vocab, pad_id=pad_id)
        if cfg.share_embeddings:
            # One table for source, target (and, tied, the output layer): names,
            # numbers and cognates spelled alike in both languages learn once.
            self.encoder.embed.weight = self.decoder.embed.weight
        self.reset_parameters()

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, *, src_vocab: int, tgt_vocab: int, pad_id: int
    ) -> Seq2Seq:
        """Build from the model config; vocabulary sizes come from the tokenizer."""
        return cls(cfg, src_vocab=src_vocab, tgt_vocab=tgt_vocab, pad_id=pad_id)

    def reset_parameters(self) -> None:
        """Uniform(-0.1, 0.1) everywhere, zero padding embeddings.

        Why: small uniform initialisation is what converges fastest for RNN NMT
        (OpenNMT-py's default); xavier on 8k-row embeddings starts far too small.
        """
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)
        with torch.no_grad():
            self.encoder.embed.weight[self.pad_id].zero_()
            self.decoder.embed.weight[self.pad_id].zero_()

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        """Encode once per batch: states, key projections, mask and context c.

        Args:
            src: (B, S) token ids, padded with ``pad_id``.
            src_lengths: (B,) real lengths, all >= 1.
        """
        states, final = self.encoder(src, src_lengths)
        mask = torch.arange(src.size(1), device=src.device)[None, :] < src_lengths[:, None]
        return EncoderOutput(
            states=states,
            keys=self.decoder.attention.keys(states),
            mask=mask,
            context=torch.tanh(self.bridge(final)),
        )

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        """The decoder's state before the first target token."""
        return self.decoder.init_state(enc.context)

    def decode_step(
        self, prev_tokens: Tensor, state: DecoderState, enc: EncoderOutput
    ) -> tuple[Tensor, DecoderState, Tensor]:
        """One decoder step: the teacher-forced computation for T = 1.

        Search runs the same function through ``seq2seq.decoding.inference``, which reads
        the frozen weights with the token-only products precomputed.

        Args:
            prev_tokens: (N,) the previous token of each hypothesis.
            state: the hypotheses' recurrent state.
            enc: encoder output with N rows.

        Returns:
            scores (N, V) (logits, or log-probs for the two-level softmax), the new
            state, attention (N, S).
        """
        logits, state, weights = self.decoder(prev_tokens[:, None], state, enc)
        return logits[:, 0], state, weights[:, 0]

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass over whole target sequences.

        Args:
            src: (B, S) source ids; src_lengths: (B,) real lengths.
            tgt_in: (B, T) target ids shifted right (BOS first), padded.

        Returns:
            scores (B, T, V) (logits, or log-probs for the two-level softmax) and
            attention weights (B, T, S).
        """
        hidden, weights = self.features(src, src_lengths, tgt_in)
        return self.decoder.scores(hidden), weights

    def features(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher-forced pass up to the deep output: (B, T, E) and attention."""
        enc = self.encode(src, src_lengths)
        hidden, _, weights = self.decoder.features(tgt_in, self.init_state(enc), enc)
        return hidden, weights

    def loss(
        self,
        src: Tensor,
        src_lengths: Tensor,
        tgt_in: Tensor,
        tgt_out: Tensor,
        *,
        label_smoothing: float = 0.0,
    ) -> tuple[Tensor, int]:
        """Teacher-forced training loss: the summed token loss over real target
        positions (masked on padding) and their count.

        Why here and not on ``forward``'s scores: the two-level softmax's loss
        never computes most of the scores that ``forward`` returns.
        """
        hidden, _ = self.features(src, src_lengths, tgt_in)
        return self.decoder.loss(
            hidden, tgt_out, pad_id=self.pad_id, label_smoothing=label_smoothing
        )
