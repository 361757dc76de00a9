"""Batched beam search over any model that satisfies `seq2seq.decoding.search.Searchable`.

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

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from seq2seq.decoding.search import (
    NEG_INF,
    Hypothesis,
    Searchable,
    SelectableT,
    _worth_compacting,
    length_penalty,
    max_lengths,
    next_tokens,
)

__all__ = ["beam_search"]


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
