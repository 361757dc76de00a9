"""A two-level softmax over the vocabulary that makes training's output layer cheap.

Why: the vocabulary projection and its gradients are a large share of a training
step, yet most target tokens are among the few most frequent pieces. With
``model.softmax_head = K`` the distribution is factorised (Goodman, 2001; Grave et
al., 2017, "adaptive softmax"):

    p(v) = p_head(v)                      for the K head pieces (ids < K)
    p(v) = p_head(tail) * p_tail(v)       for the other V - K pieces

``p_head`` is a softmax over the head pieces plus one *tail class*; ``p_tail`` a
softmax over the tail pieces. In training every token pays for the head
(K + 1 scores) and only tokens whose target is in the tail pay for the tail, so
the output layer costs about K/V + (tail share) * (V - K)/V of a full softmax.

The head is the K lowest ids: SentencePiece numbers its pieces by score, which
follows frequency (the specials come first). Both levels read the same
deep-output vector and the same rows of the (tied) output embeddings and bias;
the tail class has its own vector and bias. ``log_probs`` returns the whole
normalised distribution (validation loss, ensembles); ``TwoLevelScores`` gives
search the head at once and a row's tail only where asked, and ``FullScores``
the same interface for a full softmax (a model's, or any (N, V) table such as an
ensemble's). Label smoothing applies within each level.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.model.loss import smoothed_nll


def _head_logits(hidden: Tensor, generator: nn.Linear, tail: nn.Linear, head: int) -> Tensor:
    """(..., K + 1): the head pieces' scores, then the tail class's."""
    weight = torch.cat([generator.weight[:head], tail.weight])
    return F.linear(hidden, weight, torch.cat([generator.bias[:head], tail.bias]))


def _tail_logits(hidden: Tensor, generator: nn.Linear, head: int) -> Tensor:
    """(..., V - K): the tail pieces' scores within the tail."""
    return F.linear(hidden, generator.weight[head:], generator.bias[head:])


def log_probs(hidden: Tensor, generator: nn.Linear, tail: nn.Linear, head: int) -> Tensor:
    """Log-probabilities of every piece, (..., V) in float32.

    Args:
        hidden: (..., E) deep-output vectors.
        generator: the (V, E) output layer (tied embeddings), with bias.
        tail: the (1, E) tail class, with bias.
        head: K, the number of head pieces.
    """
    head_lp = torch.log_softmax(_head_logits(hidden, generator, tail, head).float(), dim=-1)
    tail_lp = torch.log_softmax(_tail_logits(hidden, generator, head).float(), dim=-1)
    return torch.cat([head_lp[..., :head], tail_lp + head_lp[..., head:]], dim=-1)


def loss(
    hidden: Tensor,
    target: Tensor,
    *,
    generator: nn.Linear,
    tail: nn.Linear,
    head: int,
    pad_id: int,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, int]:
    """Summed token loss over real target positions, and their count.

    Without smoothing it is ``-sum log p(y)`` under ``log_probs``'s distribution;
    with it, each level's cross-entropy is smoothed over that level's classes.

    Args:
        hidden: (B, T, E) deep-output vectors.
        target: (B, T) gold ids, ``pad_id`` on padding.
    """
    flat = hidden.reshape(-1, hidden.size(-1))
    target = target.reshape(-1)
    real = target != pad_id
    head_rows = smoothed_nll(
        _head_logits(flat, generator, tail, head), target.clamp(max=head), real, label_smoothing
    )
    total = head_rows.sum()
    in_tail = (real & (target >= head)).nonzero()[:, 0]
    if in_tail.numel():
        tail_logits = _tail_logits(flat.index_select(0, in_tail), generator, head)
        tail_target = target.index_select(0, in_tail) - head
        everywhere = torch.ones_like(tail_target, dtype=torch.bool)
        total = total + smoothed_nll(tail_logits, tail_target, everywhere, label_smoothing).sum()
    return total, int(real.sum())


# ------------------------------------------------------------------------ search time


def class_scores(hidden: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(C, N) scores of N vectors (N, E) against C classes, class-major.

    Why class-major: for thousands of classes and the tens to hundreds of rows of a
    search step, MKL computes ``W h^T`` markedly faster than ``h W^T``, and ranking
    along dim 0 costs the same.
    """
    return torch.addmm(bias[:, None], weight, hidden.t())


def _ranked(scores: Tensor, norm: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Each row's ``width`` best classes of class-major scores (C, N), row-major:
    log-probs (scores minus ``norm``, (N,)) and ids, both (N, width)."""
    best, ids = scores.topk(min(width, scores.size(0)), dim=0)
    return (best - norm).t().contiguous(), ids.t().contiguous()


class TwoLevelScores:
    """One search step's distribution under the two-level softmax, scored on demand.

    The head (pieces ``0..K-1``) and the tail class are scored for every row at once;
    a row's tail pieces only when ``tail`` asks for that row. Every tail piece's
    log-prob is at most the tail class's (``tail_bound``), which is what lets search
    skip the tail where it cannot matter (``seq2seq.decoding.search`` owns that rule).

    Args:
        hidden: (N, E) deep-output vectors.
        generator: the (V, E) output layer, with bias.
        tail: the (1, E) tail class, with bias.
        head: K, the number of head pieces.
    """

    def __init__(self, hidden: Tensor, generator: nn.Linear, tail: nn.Linear, head: int) -> None:
        self.hidden = hidden
        self.generator = generator
        self.tail_class = tail
        self.head_size = head

    @cached_property
    def _head(self) -> tuple[Tensor, Tensor, Tensor]:
        """Head scores (K, N) class-major, each row's log normaliser (N,) and its tail
        class's log-prob (N,), all float32."""
        head = self.head_size
        weight, bias = self.generator.weight, self.generator.bias
        scores = class_scores(self.hidden, weight[:head], bias[:head]).float()
        tail = class_scores(self.hidden, self.tail_class.weight, self.tail_class.bias).float()[0]
        norm = torch.logaddexp(scores.logsumexp(0), tail)
        return scores, norm, tail - norm

    def head(self, width: int) -> tuple[Tensor, Tensor]:
        """Each row's ``width`` (at most K) best head pieces: log-probs and ids, (N, width)."""
        scores, norm, _ = self._head
        return _ranked(scores, norm, width)

    def log_prob(self, token: int) -> Tensor:
        """(N,) the log-prob of one piece in every row."""
        scores, norm, tail_lp = self._head
        if token < self.head_size:
            return scores[token] - norm
        tail_scores = self._tail_scores(self.hidden)
        return tail_scores[token - self.head_size] - tail_scores.logsumexp(0) + tail_lp

    def tail_bound(self) -> Tensor:
        """(N,) an upper bound on the log-prob of every tail piece: the tail class's."""
        return self._head[2]

    def tail(self, rows: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """The best ``width`` tail pieces of ``rows`` ((R,) long): log-probs and ids, (R, w)."""
        tail_scores = self._tail_scores(self.hidden[rows])
        best, ids = tail_scores.topk(min(width, tail_scores.size(0)), dim=0)
        best = best - tail_scores.logsumexp(0) + self._head[2][rows]
        return best.t(), ids.t() + self.head_size

    def log_probs(self) -> Tensor:
        """(N, V) every piece's log-prob, as ``log_probs`` computes them."""
        return log_probs(self.hidden, self.generator, self.tail_class, self.head_size)

    def _tail_scores(self, hidden: Tensor) -> Tensor:
        """(V - K, R) the tail pieces' scores within the tail, class-major, float32."""
        weight, bias = self.generator.weight, self.generator.bias
        return class_scores(hidden, weight[self.head_size :], bias[self.head_size :]).float()


class FullScores:
    """One search step's distribution under a full softmax: every piece is in the head,
    so there is no tail.

    The one one-level `TokenScores` (``seq2seq.decoding.search``), in two forms: a
    model's step passes its deep-output vectors and output layer, which are scored
    class-major (``class_scores`` says why); an ensemble or a test model passes an
    (N, V) table of logits or log-probs alone, normalised here in one fused pass.

    Args:
        hidden: (N, E) deep-output vectors; without ``generator``, (N, V) logits or
            log-probs.
        generator: the (V, E) output layer, with bias.
    """

    def __init__(self, hidden: Tensor, generator: nn.Linear | None = None) -> None:
        self.hidden = hidden
        self.generator = generator
        self.head_size = hidden.size(-1) if generator is None else generator.out_features

    @cached_property
    def _table(self) -> Tensor:
        """(N, V) every piece's log-prob, float32, row-major."""
        logits = self.hidden if self.generator is None else self.generator(self.hidden)
        return torch.log_softmax(logits.float(), dim=-1)

    @cached_property
    def _scores(self) -> tuple[Tensor, Tensor]:
        """Class-major scores (V, N) and each row's log normaliser (N,), float32."""
        assert self.generator is not None
        scores = class_scores(self.hidden, self.generator.weight, self.generator.bias).float()
        return scores, scores.logsumexp(0)

    def head(self, width: int) -> tuple[Tensor, Tensor]:
        """Each row's ``width`` best pieces: log-probs and ids, (N, width)."""
        if self.generator is None:
            best, ids = self._table.topk(min(width, self.head_size), dim=-1)
            return best, ids
        return _ranked(*self._scores, width)

    def log_prob(self, token: int) -> Tensor:
        """(N,) the log-prob of one piece in every row."""
        if self.generator is None:
            return self._table[:, token]
        scores, norm = self._scores
        return scores[token] - norm

    def tail_bound(self) -> None:
        """No tail: ``head`` ranks every piece."""
        return None

    def tail(self, rows: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """The tail is empty: (R, 0) log-probs and ids."""
        empty = self.hidden.new_empty(rows.numel(), 0, dtype=torch.float32)
        return empty, torch.empty_like(empty, dtype=torch.long)

    def log_probs(self) -> Tensor:
        """(N, V) every piece's log-prob."""
        return self._table
