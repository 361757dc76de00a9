"""Batched greedy and beam search over any model that satisfies `Searchable`.

Search never imports the model: it sees three calls (`encode`, `init_state`, `step`) and
objects that can pick their batch rows with ``select(index)`` — fairseq's
``reorder_incremental_state`` idea, but returning a new object instead of mutating one.

A step's scores come in two levels (`TokenScores`): a head ranked for every row and a tail
that a two-level softmax scores only on demand. Search owns the rules: which rows need
their tail (`_tail_rows`: only those where a tail token could reach what search reads),
and EOS forced at a sentence's budget (`_force_eos`). A model that scores every token
wraps its logits in ``seq2seq.model.softmax.FullScores`` and has no tail.

Both searches keep the whole batch in tensors and never loop over sentences or hypotheses
inside the step loop. A sentence's output never depends on its batch: its maximum length,
its stopping decision and its finished hypotheses are all computed per sentence. A
sentence that is done leaves the batch (its encoder rows, decoder state and beams are
dropped) as soon as a quarter of the rows are done (until then greedy pins it to EOS and
beam search freezes its beam at ``-inf``), so late steps compute little more than the
sentences still being searched, through few distinct batch shapes; its finished
hypotheses stay in a whole-batch table that the live sentences write into by index.

Beam search lives in `seq2seq.decoding.beam`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

__all__ = [
    "Hypothesis",
    "Searchable",
    "Selectable",
    "TokenScores",
    "greedy",
    "length_penalty",
    "max_lengths",
    "next_tokens",
]

NEG_INF = -math.inf
SelectableT = TypeVar("SelectableT", bound="Selectable")


class Selectable(Protocol):
    """An encoder output or decoder state whose batch rows can be picked."""

    def select(self: SelectableT, index: Tensor, /) -> SelectableT:
        """New object holding rows ``index`` ((N,) long) of the batch dimension."""
        ...


class TokenScores(Protocol):
    """One step's next-token log-probs for N rows, scored in two levels.

    The head, ids ``0 .. head_size - 1``, is ranked for every row; the tail, the other
    ids, only for the rows search asks for, and ``tail_bound`` caps every tail token's
    log-prob so that search can tell which rows those are (`_tail_rows`). A one-level
    distribution has ``head_size = V`` and no tail bound.
    """

    head_size: int

    def head(self, width: int, /) -> tuple[Tensor, Tensor]:
        """Each row's ``width`` best head tokens (fewer if the head is smaller), best
        first: float32 log-probs and long ids, (N, width), fresh tensors."""
        ...

    def log_prob(self, token: int, /) -> Tensor:
        """(N,) float32 log-prob of ``token`` in every row."""
        ...

    def tail_bound(self) -> Tensor | None:
        """(N,) no tail token of a row has a higher log-prob; None without a tail."""
        ...

    def tail(self, rows: Tensor, width: int, /) -> tuple[Tensor, Tensor]:
        """The ``width`` best tail tokens of ``rows`` ((R,) long), best first:
        float32 log-probs and long ids, (R, width) or fewer columns."""
        ...

    def log_probs(self) -> Tensor:
        """(N, V) float32 log-prob of every token in every row."""
        ...


class Searchable(Protocol):
    """What search needs from a model (``seq2seq.decoding.inference.Inference`` for a trained
    `Seq2Seq`, ``seq2seq.decoding.ensemble.EnsembleInference`` for several)."""

    def encode(self, src: Tensor, src_lengths: Tensor, /) -> Selectable:
        """Encode ``src`` (B, S) long with ``src_lengths`` (B,) long."""
        ...

    def init_state(self, enc: Any, /) -> Selectable:
        """First decoder state for the encoder output ``enc``."""
        ...

    def step(self, prev_tokens: Tensor, state: Any, enc: Any, /) -> tuple[TokenScores, Any, Tensor]:
        """One step from ``prev_tokens`` (N,): the next-token scores, the new state
        (a `Selectable`), attention (N, S)."""
        ...


@dataclass
class Hypothesis:
    """One finished translation.

    Attributes:
        tokens: output ids without BOS and EOS.
        score: length-normalised log-prob used for ranking (raw log-prob for `greedy`).
        log_prob: total log-prob of ``tokens`` followed by EOS.
        attention: (len(tokens) + 1, S_i) on CPU, one row per output step including EOS,
            columns restricted to the sentence's S_i real source positions; None unless
            requested.
    """

    tokens: list[int]
    score: float
    log_prob: float
    attention: Tensor | None = None


# --------------------------------------------------------------------------- shared helpers


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` (Wu et al., 2016, eq. 14).

    Dividing a log-prob by it counters beam search's preference for short outputs;
    ``length`` counts output tokens including EOS, and ``alpha = 0`` gives 1 (raw log-prob).
    """
    return ((5.0 + length) / 6.0) ** alpha


def max_lengths(src_lengths: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
    """Per-sentence output budget ``floor(a * src_len + b)`` in tokens, EOS not counted.

    Per sentence rather than per batch, so a translation never depends on its batch-mates.

    Args:
        src_lengths: (B,) long.

    Returns:
        (B,) long, clamped at 0 (an empty output followed by the forced EOS).
    """
    budget = torch.floor(src_lengths.double() * max_len_a + max_len_b).long()
    return budget.clamp(min=0)


def _worth_compacting(live: int, rows: int) -> bool:
    """Drop finished sentences only once at most 3/4 of the rows are live.

    Every batch size a matmul sees costs a oneDNN primitive (time and, in bf16,
    memory), so shrinking the batch in a few large steps beats shrinking it at every
    step; until then a finished sentence stays in the batch, frozen.
    """
    return live <= 0.75 * rows


def next_tokens(
    model: Searchable,
    prev: Tensor,
    state: Any,
    enc: Any,
    *,
    width: int,
    must_end: Tensor,
    eos_id: int,
    beam_scores: Tensor | None = None,
) -> tuple[Tensor, Tensor, Any, Tensor]:
    """One step: each row's ``width`` best next tokens and their log-probs, best first,
    with EOS forced where ``must_end``; the new state and attention.

    Exact as far as search reads them, while a row's tail is scored only where it can
    matter (`_tail_rows`). ``beam_scores`` (B, K) are the live beams' log-probs when
    the rows are B sentences' K beams; None for greedy.
    """
    scores, state, attn = model.step(prev, state, enc)
    if scores.tail_bound() is not None and (eos_id >= scores.head_size or width > scores.head_size):
        # The tail rule needs EOS and ``width`` tokens in the head: rank every token.
        table = scores.log_probs()
        best, tokens = table.topk(min(width, table.size(-1)), dim=-1)
        return *_force_eos(best, tokens, must_end, table[:, eos_id], eos_id), state, attn
    best, tokens = _force_eos(*scores.head(width), must_end, scores.log_prob(eos_id), eos_id)
    rows = _tail_rows(scores, best, tokens, must_end, eos_id=eos_id, beam_scores=beam_scores)
    if rows.numel():
        tail_best, tail_tokens = scores.tail(rows, width)
        merged, pick = torch.cat([best[rows], tail_best], -1).topk(width, dim=-1)
        best[rows] = merged
        tokens[rows] = torch.cat([tokens[rows], tail_tokens], -1).gather(1, pick)
    return best, tokens, state, attn


def _force_eos(
    best: Tensor, tokens: Tensor, must_end: Tensor, eos_log_probs: Tensor, eos_id: int
) -> tuple[Tensor, Tensor]:
    """Rows in ``must_end`` (at their length budget) become EOS, with its own log-prob,
    then ``-inf``.

    Two ways to the same result. On the CPU only those rows are rewritten, in place:
    rows at their budget are rare, so finding them (``nonzero``) and touching them alone
    costs least. On a GPU, finding them would make the host wait for the device at
    every step, so every row goes through a selection over its (width,) candidates.
    """
    if best.device.type != "cpu":
        return _force_eos_selecting(best, tokens, must_end, eos_log_probs, eos_id)
    ends = must_end.nonzero()[:, 0]
    if ends.numel():
        best[ends] = NEG_INF
        best[ends, 0] = eos_log_probs[ends]
        tokens[ends, 0] = eos_id
    return best, tokens


def _force_eos_selecting(
    best: Tensor, tokens: Tensor, must_end: Tensor, eos_log_probs: Tensor, eos_id: int
) -> tuple[Tensor, Tensor]:
    """`_force_eos` without a host sync: new tensors, every row selected."""
    first = torch.arange(best.size(1), device=best.device) == 0
    ended = must_end[:, None]
    forced = torch.where(first, eos_log_probs[:, None].to(best.dtype), NEG_INF)
    return torch.where(ended, forced, best), torch.where(ended & first, eos_id, tokens)


def _tail_rows(
    scores: TokenScores,
    best: Tensor,
    tokens: Tensor,
    must_end: Tensor,
    *,
    eos_id: int,
    beam_scores: Tensor | None,
) -> Tensor:
    """(R,) rows whose tail could hold a token that search reads.

    Greedy reads a row's best ``width`` tokens, so a row needs its tail when its tail
    bound reaches its ``width``-th best head log-prob. Beam search reads a sentence's
    best K non-EOS (beam score + log-prob) sums and every EOS sum above them
    (`_top_candidates`). A tail token (never EOS) matters only if its beam's score plus
    its row's tail bound reaches the sentence's K-th best non-EOS head sum: below that
    floor, K non-EOS head sums beat it, and so does every EOS that ranks among the
    best K. Rows at their budget never need the tail.
    """
    bound = scores.tail_bound()
    if bound is None:
        return must_end.new_empty(0, dtype=torch.long)
    if beam_scores is None:  # greedy: each row is its own group, EOS counts
        offsets, keep, counted = torch.zeros_like(bound)[:, None], best.size(1), best
    else:
        offsets, keep = beam_scores, beam_scores.size(1)
        counted = best.masked_fill(tokens == eos_id, NEG_INF)
    groups, k = offsets.shape
    sums = (offsets[:, :, None] + counted.view(groups, k, -1)).view(groups, -1)
    floor = sums.topk(min(keep, sums.size(1)), dim=1).values[:, -1]
    reach = offsets.reshape(-1) + bound
    need = torch.isfinite(reach) & (reach >= floor.repeat_interleave(k)) & ~must_end
    return need.nonzero()[:, 0]


# ----------------------------------------------------------------------------------- greedy


def greedy(
    model: Searchable,
    src: Tensor,
    src_lengths: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    max_len_a: float,
    max_len_b: int,
    return_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Arg-max decoding of a batch: the fast path, with none of the beam bookkeeping.

    Pinned to `beam_search` with ``beam_size=1`` by a test. A sentence leaves the batch as
    soon as it emits EOS (its encoder rows and state are dropped), so the remaining steps
    only compute the sentences still being translated.

    Args:
        src: (B, S) long, padded.
        src_lengths: (B,) long.

    Returns:
        One single-hypothesis list per sentence; ``score`` is the raw log-prob.
    """
    with torch.no_grad():  # not inference_mode: see Translator._search_mode (bf16 casts)
        batch, device = src.size(0), src.device
        budget = max_lengths(src_lengths, max_len_a, max_len_b).to(device)
        longest = int(budget.max()) + 1
        enc = model.encode(src, src_lengths)
        state = model.init_state(enc)
        rows = torch.arange(batch, device=device)  # batch rows still being decoded
        prev = torch.full((batch,), bos_id, dtype=torch.long, device=device)
        tokens = torch.full((batch, longest), eos_id, dtype=torch.long, device=device)
        total = torch.zeros(batch, device=device)
        attention = None
        if return_attention:  # on the device: one copy at the end, not one per step
            attention = torch.zeros(batch, longest, src.size(1), device=device)
        alive = torch.ones(batch, dtype=torch.bool, device=device)  # per row of `rows`
        for step in range(longest):
            must_end = step >= budget[rows]
            best, prev, state, attn = next_tokens(
                model, prev, state, enc, width=1, must_end=must_end, eos_id=eos_id
            )
            best, prev = best[:, 0], prev[:, 0]
            prev = prev.masked_fill(~alive, eos_id)
            total[rows] = total[rows] + best.masked_fill(~alive, 0.0)
            tokens[rows, step] = prev
            if attention is not None:
                attention[rows, step] = attn.float()
            alive = prev != eos_id
            live = alive.nonzero().squeeze(1)
            if live.numel() == 0:
                break
            if _worth_compacting(live.numel(), rows.numel()):
                rows, prev, alive = rows[live], prev[live], alive[live]
                enc, state = enc.select(live), state.select(live)
        return _greedy_hypotheses(tokens, total, attention, src_lengths, eos_id)


def _greedy_hypotheses(
    tokens: Tensor, log_probs: Tensor, attention: Tensor | None, src_lengths: Tensor, eos_id: int
) -> list[list[Hypothesis]]:
    """Cut each row at its first EOS (there always is one: the budget forces it).

    Args:
        tokens: (B, T) long, EOS-padded.
        log_probs: (B,) float.
        attention: (B, T, S) or None.
        src_lengths: (B,) long.
    """
    tokens, log_probs = tokens.cpu(), log_probs.cpu()
    attention = None if attention is None else attention.cpu()
    lengths = (tokens == eos_id).long().argmax(dim=1).tolist()
    src_lens = src_lengths.tolist()  # one copy from the device, not one per sentence
    hyps = []
    for i, length in enumerate(lengths):
        attn = None
        if attention is not None:
            attn = attention[i, : length + 1, : src_lens[i]].float()
        score = float(log_probs[i])
        hyps.append([Hypothesis(tokens[i, :length].tolist(), score, score, attn)])
    return hyps
