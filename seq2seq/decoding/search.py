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

Beam search, per step (fairseq's candidate rule):

1. score every extension of every live hypothesis, force EOS at the sentence's max length;
2. take the top ``2K`` of the ``K x V`` extensions per sentence (from each beam's top ``K + 1``);
3. EOS candidates among the first ``K`` join the sentence's finished set (the best ``K`` by
   length-normalised score are kept, so ``nbest`` never changes the 1-best);
4. the first ``K`` non-EOS candidates become the new beam (at most ``K`` candidates are EOS,
   so there are always enough);
5. a sentence is done once it holds ``K`` finished hypotheses and its best live hypothesis,
   normalised at its current length, scores no better than the worst finished one (the
   Hugging Face ``early_stopping=False`` rule), or once it reached its maximum length.

With ``alpha = 0`` the rule in 5 is exact (log-probs only fall as a hypothesis grows); with
``alpha > 0`` a longer hypothesis can still overtake, so it is the usual heuristic. With
``K = 1`` it stops exactly when EOS is the arg-max, which is why beam-1 equals `greedy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

__all__ = [
    "Hypothesis",
    "Searchable",
    "Selectable",
    "TokenScores",
    "beam_search",
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


# ------------------------------------------------------------------------------ beam search


@dataclass
class _Beams:
    """The live hypotheses of the sentences still searched, K per sentence.

    Attributes:
        tokens: (A, K, t) long, tokens generated so far.
        scores: (A, K) cumulative log-probs; ``-inf`` marks an empty or retired slot.
        parents: (A, K) long, the slot of the previous beam each hypothesis extends.
        attention: (A, K, t, S) attention rows of those tokens, or None.
        sentences: (A,) long, which sentences of the batch these are.
        budget: (A,) long, their length budgets.
    """

    tokens: Tensor
    scores: Tensor
    parents: Tensor
    attention: Tensor | None
    sentences: Tensor
    budget: Tensor

    def select(self, keep: Tensor) -> _Beams:
        """The beams of sentences ``keep`` ((A',) long, rows of these) only."""
        attention = None if self.attention is None else self.attention[keep]
        return _Beams(
            self.tokens[keep],
            self.scores[keep],
            self.parents[keep],
            attention,
            self.sentences[keep],
            self.budget[keep],
        )


@dataclass
class _Finished:
    """Up to K finished hypotheses per sentence, best first.

    Attributes:
        tokens: (B, K, L) long, EOS-padded; L = the longest budget in the batch.
        lengths: (B, K) long, number of tokens (EOS not counted).
        log_probs: (B, K) total log-probs including EOS.
        scores: (B, K) length-normalised log-probs, sorted descending; ``-inf`` = empty slot.
        attention: (B, K, L + 1, S), or None.
    """

    tokens: Tensor
    lengths: Tensor
    log_probs: Tensor
    scores: Tensor
    attention: Tensor | None

    def rows(self, index: Tensor) -> _Finished:
        """The finished sets of sentences ``index`` ((A,) long)."""
        attention = None if self.attention is None else self.attention[index]
        return _Finished(
            self.tokens[index],
            self.lengths[index],
            self.log_probs[index],
            self.scores[index],
            attention,
        )

    def with_rows(self, index: Tensor, part: _Finished) -> _Finished:
        """A copy whose sentences ``index`` hold ``part`` instead."""

        def put(full: Tensor, new: Tensor) -> Tensor:
            return full.index_copy(0, index, new)

        attention = None
        if self.attention is not None and part.attention is not None:
            attention = put(self.attention, part.attention)
        return _Finished(
            put(self.tokens, part.tokens),
            put(self.lengths, part.lengths),
            put(self.log_probs, part.log_probs),
            put(self.scores, part.scores),
            attention,
        )


@dataclass
class _Candidates:
    """The top 2K extensions of each sentence's beam, best first.

    Attributes:
        scores: (B, 2K) cumulative log-probs.
        beams: (B, 2K) long, which live hypothesis (0..K-1) each one extends.
        tokens: (B, 2K) long, the token appended.
    """

    scores: Tensor
    beams: Tensor
    tokens: Tensor


def beam_search(
    model: Searchable,
    src: Tensor,
    src_lengths: Tensor,
    *,
    beam_size: int,
    nbest: int = 1,
    alpha: float = 1.0,
    bos_id: int,
    eos_id: int,
    max_len_a: float,
    max_len_b: int,
    return_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Batched beam search with GNMT length normalisation; the algorithm is in the module doc.

    Args:
        src: (B, S) long, padded.
        src_lengths: (B,) long.
        beam_size: K, live hypotheses per sentence.
        nbest: hypotheses returned per sentence (≤ beam_size); fewer when the search space
            holds fewer distinct outputs.
        alpha: length-penalty exponent, 0 ranks by raw log-prob.

    Returns:
        Per sentence, up to ``nbest`` hypotheses, best score first.
    """
    _check_beam_args(beam_size, nbest)
    with torch.no_grad():  # not inference_mode: see Translator._search_mode (bf16 casts)
        batch, k = src.size(0), beam_size
        budget = max_lengths(src_lengths, max_len_a, max_len_b).to(src.device)
        enc = model.encode(src, src_lengths).select(_beam_rows(batch, k, src.device))
        state = model.init_state(enc)
        beams = _start_beams(budget, k, src.size(1), return_attention)
        finished = _no_finished(beams, int(budget.max()))
        # Each beam's K + 1 best tokens are enough: see _top_candidates.
        step_tokens = partial(next_tokens, model, width=k + 1, eos_id=eos_id)
        for step in range(int(budget.max()) + 1):
            at_budget = step >= beams.budget
            row_best, row_tokens, state, attn = step_tokens(
                _last_tokens(beams, bos_id),
                state,
                enc,
                must_end=at_budget.repeat_interleave(k),
                beam_scores=beams.scores,
            )
            candidates = _top_candidates(beams.scores, row_best, row_tokens)
            finished = _finalise(finished, beams, candidates, attn, alpha=alpha, eos_id=eos_id)
            beams = _advance(beams, candidates, attn, eos_id=eos_id)
            done = _is_done(finished.scores[beams.sentences], beams, at_budget, alpha=alpha)
            rows = _flat_rows(beams.parents)
            if bool(done.all()):
                break
            if bool(done.any()):
                beams, rows, enc = _retire(done, beams, rows, enc)
            state = state.select(rows)
        return _beam_hypotheses(finished, src_lengths, nbest)


def _retire(
    done: Tensor, beams: _Beams, rows: Tensor, enc: SelectableT
) -> tuple[_Beams, Tensor, SelectableT]:
    """Sentences ``done`` ((A,) bool) leave the batch once enough are done; until then
    their beams are frozen at ``-inf``. Returns the beams, the (A'*K,) state rows the
    next step continues and the encoder rows of the sentences left."""
    keep = (~done).nonzero().squeeze(1)
    if not _worth_compacting(keep.numel(), done.numel()):
        # A -inf beam can add nothing to its sentence's finished set.
        beams.scores = beams.scores.masked_fill(done[:, None], NEG_INF)
        return beams, rows, enc
    k = beams.scores.size(1)
    rows = rows.view(-1, k)[keep].reshape(-1)
    return beams.select(keep), rows, enc.select(_beam_slots(keep, k))


def _check_beam_args(beam_size: int, nbest: int) -> None:
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if not 1 <= nbest <= beam_size:
        raise ValueError(
            f"nbest must be between 1 and beam_size, got nbest={nbest} with beam_size={beam_size}"
        )


def _beam_rows(batch: int, k: int, device: torch.device) -> Tensor:
    """(B*K,) row index that repeats every sentence K times: sentence b owns rows bK..bK+K-1."""
    return torch.arange(batch, device=device).repeat_interleave(k)


def _beam_slots(sentences: Tensor, k: int) -> Tensor:
    """(A*K,) rows of a (B*K)-row tensor that belong to ``sentences`` ((A,) long)."""
    return (sentences[:, None] * k + torch.arange(k, device=sentences.device)).reshape(-1)


def _start_beams(budget: Tensor, k: int, src_len: int, with_attention: bool) -> _Beams:
    """One empty hypothesis per sentence; the other K-1 slots start at ``-inf``.

    Otherwise the first step would fill the beam with K copies of the same extensions.

    Args:
        budget: (B,) long, each sentence's length budget.
    """
    batch, device = budget.size(0), budget.device
    scores = torch.full((batch, k), NEG_INF, device=device)
    scores[:, 0] = 0.0
    tokens = torch.zeros(batch, k, 0, dtype=torch.long, device=device)
    parents = torch.arange(k, device=device).expand(batch, k)
    attention = torch.zeros(batch, k, 0, src_len, device=device) if with_attention else None
    return _Beams(tokens, scores, parents, attention, torch.arange(batch, device=device), budget)


def _no_finished(beams: _Beams, longest: int) -> _Finished:
    """Empty finished set with room for hypotheses of up to ``longest`` tokens."""
    batch, k = beams.scores.shape
    device = beams.scores.device
    attention = None
    if beams.attention is not None:
        attention = torch.zeros(batch, k, longest + 1, beams.attention.size(3), device=device)
    return _Finished(
        tokens=torch.zeros(batch, k, longest, dtype=torch.long, device=device),
        lengths=torch.zeros(batch, k, dtype=torch.long, device=device),
        log_probs=torch.full((batch, k), NEG_INF, device=device),
        scores=torch.full((batch, k), NEG_INF, device=device),
        attention=attention,
    )


def _last_tokens(beams: _Beams, bos_id: int) -> Tensor:
    """(B*K,) input tokens of the next step: BOS first, then each hypothesis' last token."""
    batch, k, length = beams.tokens.shape
    if length == 0:
        return torch.full((batch * k,), bos_id, dtype=torch.long, device=beams.tokens.device)
    return beams.tokens[:, :, -1].reshape(-1)


def _top_candidates(scores: Tensor, row_best: Tensor, row_tokens: Tensor) -> _Candidates:
    """Best 2K extensions per sentence over all (beam, token) pairs.

    2K guarantees K non-EOS candidates, since each beam contributes at most one EOS.
    Search reads only the sentence's top K (for EOS) and its first K non-EOS
    candidates, and each of those is among the top K + 1 tokens of its own beam (a
    beam's (K+1)-th token has K better ones in its own beam, at most one of them EOS).
    So a per-row ``topk`` of width K + 1 over the log-probs, then a ``topk`` over the
    K x (K+1) survivors, gives the same beams and finished hypotheses as ranking all
    K x V sums, without a (B, K x V) tensor.

    Args:
        scores: (B, K) cumulative log-probs of the live hypotheses.
        row_best: (B*K, W) each hypothesis' best next-token log-probs (`next_tokens`).
        row_tokens: (B*K, W) long, those tokens.
    """
    batch, k = scores.shape
    width = row_best.size(-1)
    totals = scores[:, :, None] + row_best.view(batch, k, width)
    best, flat = totals.view(batch, k * width).topk(min(2 * k, k * width), dim=1)
    tokens = row_tokens.view(batch, k * width).gather(1, flat)
    return _Candidates(scores=best, beams=flat // width, tokens=tokens)


def _finalise(
    finished: _Finished,
    beams: _Beams,
    candidates: _Candidates,
    step_attention: Tensor,
    *,
    alpha: float,
    eos_id: int,
) -> _Finished:
    """Move EOS candidates ranked in the top K into the finished set, keeping the best K.

    Args:
        step_attention: (B*K, S) attention of this step, rows in the current beam order.
    """
    batch, k, length = beams.tokens.shape
    origin = candidates.beams[:, :k]
    log_probs = candidates.scores[:, :k]
    ends = (candidates.tokens[:, :k] == eos_id) & torch.isfinite(log_probs)
    if not bool(ends.any()):
        return finished
    pad = finished.tokens.size(2) - length
    attention = None
    if beams.attention is not None:
        rows = torch.cat([beams.attention, step_attention.view(batch, k, 1, -1)], dim=2)
        attention = _pad_dim2(_pick(rows, origin), pad, 0.0)
    new = _Finished(
        tokens=_pad_dim2(_pick(beams.tokens, origin), pad, eos_id),
        lengths=torch.full_like(origin, length),
        log_probs=log_probs,
        scores=log_probs.masked_fill(~ends, NEG_INF) / length_penalty(length + 1, alpha),
        attention=attention,
    )
    return finished.with_rows(beams.sentences, _keep_best(finished.rows(beams.sentences), new))


def _keep_best(old: _Finished, new: _Finished) -> _Finished:
    """Best K of the union of two finished sets, by normalised score, best first."""
    k = old.scores.size(1)
    scores, index = torch.cat([old.scores, new.scores], dim=1).topk(k, dim=1)

    def merge(a: Tensor, b: Tensor) -> Tensor:
        return _pick(torch.cat([a, b], dim=1), index)

    attention = None
    if old.attention is not None and new.attention is not None:
        attention = merge(old.attention, new.attention)
    return _Finished(
        tokens=merge(old.tokens, new.tokens),
        lengths=merge(old.lengths, new.lengths),
        log_probs=merge(old.log_probs, new.log_probs),
        scores=scores,
        attention=attention,
    )


def _advance(
    beams: _Beams, candidates: _Candidates, step_attention: Tensor, *, eos_id: int
) -> _Beams:
    """New beam: the first K non-EOS candidates, histories reordered to follow them.

    Args:
        step_attention: (B*K, S) attention of this step, rows in the current beam order.
    """
    batch, k, _ = beams.tokens.shape
    width = candidates.scores.size(1)
    is_eos = candidates.tokens == eos_id
    # Rank non-EOS candidates by position, EOS ones after all of them (fairseq's trick).
    rank = torch.arange(width, device=is_eos.device) + is_eos.long() * width
    keep = rank.topk(k, dim=1, largest=False).indices
    origin = candidates.beams.gather(1, keep)
    tokens = candidates.tokens.gather(1, keep)
    scores = candidates.scores.gather(1, keep).masked_fill(tokens == eos_id, NEG_INF)
    attention = None
    if beams.attention is not None:
        rows = torch.cat([beams.attention, step_attention.view(batch, k, 1, -1)], dim=2)
        attention = _pick(rows, origin)
    history = torch.cat([_pick(beams.tokens, origin), tokens[:, :, None]], dim=2)
    return replace(beams, tokens=history, scores=scores, parents=origin, attention=attention)


def _is_done(finished_scores: Tensor, beams: _Beams, at_budget: Tensor, *, alpha: float) -> Tensor:
    """(B,) bool: no live hypothesis of the sentence can still enter its finished set.

    True once K hypotheses are finished and the best live one, normalised at its current
    length, is no better than the worst of them (exact for alpha = 0, heuristic otherwise),
    or once the sentence reached its budget (all its hypotheses were forced to EOS).

    Args:
        finished_scores: (A, K) normalised scores of the sentences' finished sets.
        at_budget: (A,) bool, this step forced EOS.
    """
    length = beams.tokens.size(2)
    best_live = beams.scores.max(dim=1).values / length_penalty(length, alpha)
    return (best_live <= finished_scores[:, -1]) | at_budget


def _flat_rows(parents: Tensor) -> Tensor:
    """(B*K,) rows of the current (B*K)-row state that the new beam continues.

    Args:
        parents: (B, K) long, slot within each sentence's beam.
    """
    batch, k = parents.shape
    offsets = torch.arange(batch, device=parents.device)[:, None] * k
    return (offsets + parents).reshape(-1)


def _pick(values: Tensor, index: Tensor) -> Tensor:
    """Per-sentence gather along dim 1: (B, M, ...) with index (B, K) -> (B, K, ...)."""
    batch = torch.arange(values.size(0), device=values.device)[:, None]
    return values[batch, index]


def _pad_dim2(values: Tensor, amount: int, fill: float) -> Tensor:
    """Right-pad dim 2 of a (B, K, T, ...) tensor with ``fill``."""
    if amount == 0:
        return values
    shape = list(values.shape)
    shape[2] = amount
    return torch.cat([values, values.new_full(shape, fill)], dim=2)


def _beam_hypotheses(
    finished: _Finished, src_lengths: Tensor, nbest: int
) -> list[list[Hypothesis]]:
    """Turn each sentence's best ``nbest`` finished slots into `Hypothesis` objects."""
    lengths = finished.lengths.cpu().tolist()
    scores = finished.scores.cpu().tolist()
    log_probs = finished.log_probs.cpu().tolist()
    tokens = finished.tokens.cpu()
    # One copy from the device for the whole batch, not one per hypothesis.
    attention = None if finished.attention is None else finished.attention[:, :nbest].float().cpu()
    results = []
    for i, src_len in enumerate(src_lengths.cpu().tolist()):
        hyps = []
        for j in range(nbest):
            if scores[i][j] == NEG_INF:
                break
            length = lengths[i][j]
            attn = None
            if attention is not None:
                attn = attention[i, j, : length + 1, :src_len]
            hyps.append(
                Hypothesis(tokens[i, j, :length].tolist(), scores[i][j], log_probs[i][j], attn)
            )
        results.append(hyps)
    return results
