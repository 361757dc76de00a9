"""A two-level softmax over the vocabulary that makes training's output layer cheap.

Why: at the Multi30k recipe's sizes (8,000 target pieces, 256-wide deep output)
the vocabulary projection and its two gradients are about 45% of a training
step's FLOPs, yet about 92% of target tokens are among the 2,000 most frequent
pieces. With ``model.softmax_head = K`` the distribution is factorised
(Goodman, 2001; Grave et al., 2017, "adaptive softmax"):

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
normalised distribution, so search, ensembles and validation loss use it like
any other scores; ``top`` finds each row's best pieces for search while
scoring the tail only for rows where a tail piece could be among them. Label smoothing applies
within each level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.loss import smoothed_nll

NEG_INF = -math.inf


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


def top(
    hidden: Tensor,
    generator: nn.Linear,
    tail: nn.Linear,
    head: int,
    *,
    width: int,
    must_end: Tensor,
    eos_id: int,
) -> tuple[Tensor, Tensor]:
    """Each row's ``width`` most probable pieces under ``log_probs``, best first; rows
    in ``must_end`` get EOS first and ``-inf`` after it.

    Why: a tail piece's probability is at most the tail class's, so a row whose
    ``width``-th best head piece beats the tail class never needs the tail's V - K
    scores. Greedy search (``width`` 1) and beam search (``width`` K + 1) read only
    these, and for most rows the tail, three quarters of the projection, is skipped.

    Args:
        hidden: (N, E) deep-output vectors.
        width: pieces per row, at most K.
        must_end: (N,) bool, rows at their length budget.
        eos_id: EOS, which must be a head piece.

    Returns:
        log-probs (N, width) float32 and pieces (N, width) long.
    """
    if not 0 <= eos_id < head or width > head:
        raise ValueError(f"EOS (id {eos_id}) and {width} pieces must fit in the {head} head")
    head_lp = torch.log_softmax(_head_logits(hidden, generator, tail, head).float(), dim=-1)
    scores, pieces = head_lp[:, :head].topk(width, dim=-1)
    rows = ((head_lp[:, head] > scores[:, -1]) & ~must_end).nonzero()[:, 0]
    if rows.numel():
        tail_lp = torch.log_softmax(_tail_logits(hidden[rows], generator, head).float(), dim=-1)
        tail_scores, tail_pieces = (tail_lp + head_lp[rows, head:]).topk(
            min(width, tail_lp.size(-1)), dim=-1
        )
        merged, pick = torch.cat([scores[rows], tail_scores], -1).topk(width, dim=-1)
        scores[rows] = merged
        pieces[rows] = torch.cat([pieces[rows], tail_pieces + head], -1).gather(1, pick)
    return _end_where(must_end, scores, pieces, head_lp[:, eos_id], eos_id)


def top_of(
    log_probs: Tensor, *, width: int, must_end: Tensor, eos_id: int
) -> tuple[Tensor, Tensor]:
    """``top`` for a full softmax: rank the rows of an (N, V) log-prob table."""
    scores, pieces = log_probs.topk(min(width, log_probs.size(-1)), dim=-1)
    return _end_where(must_end, scores, pieces, log_probs[:, eos_id], eos_id)


def _end_where(
    must_end: Tensor, scores: Tensor, pieces: Tensor, eos_scores: Tensor, eos_id: int
) -> tuple[Tensor, Tensor]:
    """Rows in ``must_end`` become EOS (its own log-prob) then ``-inf``; in place.

    Only those rows are rewritten: building a full (N, V) mask every search step
    cost about a tenth of decoding time, for rows almost never at their budget.
    """
    ends = must_end.nonzero()[:, 0]
    if ends.numel():
        scores[ends] = NEG_INF
        scores[ends, 0] = eos_scores[ends]
        pieces[ends, 0] = eos_id
    return scores, pieces
