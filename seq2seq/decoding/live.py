"""Search over a live batch: sentences enter and leave at every decoding step.

Why: a service that searches each batch to its end makes a sentence that arrives one
step after a batch started wait for the whole batch, and the batch shrinks as its
sentences finish while new ones queue. Scheduling per step instead (Orca's
iteration-level scheduling, continuous batching in vLLM) keeps the batch full: `step`
answers the sentences that finished and drops them, `add` encodes new ones and joins
them to the running batch, whatever step the others are at.

Exactness: every rule of `seq2seq.decoding.search` is applied per sentence here too
(its budget, its stopping test, its finished set, its length penalty at its own
length), so a sentence's translation is the one `greedy` or `beam_search` gives,
whichever sentences shared its steps. Sentences of one live batch share their decoding
settings (`LiveSettings`); the caller keeps other settings in other batches.

Rows of the encoder output and decoder state are joined with `joining.join`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from seq2seq.data.batching import pad
from seq2seq.decoding.beam import _beam_slots, _flat_rows, _pick, _top_candidates
from seq2seq.decoding.joining import MIN_WIDTH, cat_rows, grow, join, width_of
from seq2seq.decoding.search import (
    NEG_INF,
    Hypothesis,
    Searchable,
    _worth_compacting,
    length_penalty,
    max_lengths,
    next_tokens,
)

__all__ = ["LiveBeam", "LiveGreedy", "LiveSearch", "LiveSettings", "live_search"]

TagT = TypeVar("TagT")


@dataclass(frozen=True)
class LiveSettings:
    """What the sentences of one live batch share."""

    beam_size: int
    nbest: int
    alpha: float
    max_len_a: float
    max_len_b: int
    bos_id: int
    eos_id: int
    attention: bool


# ------------------------------------------------------------------------------- the loop


class LiveSearch(Generic[TagT]):
    """The shared part: the sentences' tags, budgets, source lengths, encoder rows and
    decoder state; `LiveGreedy` and `LiveBeam` keep their hypotheses."""

    def __init__(self, model: Searchable, settings: LiveSettings, device: torch.device) -> None:
        self.model = model
        self.settings = settings
        self.device = device
        self.tags: list[TagT] = []
        self.src_lengths: list[int] = []
        self.answered: list[bool] = []  # frozen in the batch until it is compacted
        self.budget = torch.zeros(0, dtype=torch.long, device=device)
        self.steps = torch.zeros(0, dtype=torch.long, device=device)  # tokens so far
        self.enc: Any = None
        self.state: Any = None

    @property
    def size(self) -> int:
        """Sentences being searched (answered ones excluded)."""
        return self.answered.count(False)

    @property
    def pieces(self) -> int:
        """Source pieces of the sentences being searched."""
        return sum(n for n, done in zip(self.src_lengths, self.answered, strict=True) if not done)

    def add(self, sources: Sequence[Sequence[int]], tags: Sequence[TagT]) -> None:
        """Encode ``sources`` (non-empty id lists) and let them join the next step."""
        if not sources:
            return
        s = self.settings
        src, lengths = pad(sources)
        # Encoded at their own width, as a batch of their own would be: the encoder's
        # cost grows with the positions it runs over, and `join` pads them afterwards.
        src = grow(src, 1, max(src.size(1), MIN_WIDTH), 0).to(self.device)
        width = max(src.size(1), width_of(self.enc) if self.enc is not None else 0)
        lengths = lengths.to(self.device)
        enc = self.model.encode(src, lengths)
        if s.beam_size > 1:  # sentence b owns rows bK .. bK + K - 1
            enc = enc.select(
                torch.arange(len(sources), device=self.device).repeat_interleave(s.beam_size)
            )
        state = self.model.init_state(enc)
        budget = max_lengths(lengths, s.max_len_a, s.max_len_b)
        self._add_rows(budget, width)
        if self.enc is None:
            self.enc, self.state = enc, state
        else:
            self.enc, self.state = join(self.enc, enc, width), join(self.state, state, width)
        self.tags.extend(tags)
        self.src_lengths.extend(len(ids) for ids in sources)
        self.answered.extend(False for _ in sources)
        self.budget = torch.cat([self.budget, budget])
        self.steps = torch.cat([self.steps, torch.zeros_like(budget)])

    def _add_rows(self, budget: Tensor, width: int) -> None:
        """Room for new sentences with ``budget`` (N,) and ``width`` source positions."""
        raise NotImplementedError

    def _keep(self, keep: Tensor) -> None:
        """Only sentences ``keep`` ((A,) long) stay in the batch."""
        k = self.settings.beam_size
        index = keep.tolist()
        self.tags = [self.tags[i] for i in index]
        self.src_lengths = [self.src_lengths[i] for i in index]
        self.answered = [self.answered[i] for i in index]
        self.budget, self.steps = self.budget[keep], self.steps[keep]
        rows = _beam_slots(keep, k)
        self.enc, self.state = self.enc.select(rows), self.state.select(rows)
        self._select(keep)

    def _select(self, keep: Tensor) -> None:
        """Keep the hypotheses of sentences ``keep``."""
        raise NotImplementedError

    def _retire(self, done: list[int]) -> None:
        """Mark ``done`` answered; drop answered sentences once few enough are left
        (`search._worth_compacting`), or all of them when none is left."""
        for i in done:
            self.answered[i] = True
        live = [i for i, answered in enumerate(self.answered) if not answered]
        if not live or _worth_compacting(len(live), len(self.answered)):
            self._keep(torch.tensor(live, dtype=torch.long, device=self.device))
            if not live:
                self.enc = self.state = None


class LiveGreedy(LiveSearch[TagT]):
    """`search.greedy` over a live batch."""

    def __init__(self, model: Searchable, settings: LiveSettings, device: torch.device) -> None:
        super().__init__(model, settings, device)
        self.prev = torch.zeros(0, dtype=torch.long, device=device)
        self.total = torch.zeros(0, device=device)
        self.tokens = torch.zeros(0, 1, dtype=torch.long, device=device)
        self.attention: Tensor | None = torch.zeros(0, 1, 1) if settings.attention else None

    def _add_rows(self, budget: Tensor, width: int) -> None:
        n, eos = budget.numel(), self.settings.eos_id
        longest = int(budget.max()) + 1
        self.prev = torch.cat([self.prev, budget.new_full((n,), self.settings.bos_id)])
        self.total = torch.cat([self.total, torch.zeros(n, device=self.device)])
        new_tokens = budget.new_full((n, longest), eos)
        self.tokens = cat_rows(self.tokens, new_tokens, [1], eos)
        if self.attention is not None:
            self.attention = cat_rows(self.attention, torch.zeros(n, longest, width), [1, 2], 0)

    def _select(self, keep: Tensor) -> None:
        self.prev, self.total, self.tokens = self.prev[keep], self.total[keep], self.tokens[keep]
        if self.attention is not None:
            self.attention = self.attention[keep.cpu()]

    def step(self) -> list[tuple[TagT, list[Hypothesis]]]:
        """One decoding step; returns the sentences it finished, with their hypothesis."""
        if not self.tags:
            return []
        eos = self.settings.eos_id
        alive = ~torch.tensor(self.answered, device=self.device)
        best, prev, self.state, attn = next_tokens(
            self.model,
            self.prev,
            self.state,
            self.enc,
            width=1,
            must_end=self.steps >= self.budget,
            eos_id=eos,
        )
        best, prev = best[:, 0], prev[:, 0].masked_fill(~alive, eos)
        self.total = self.total + best.masked_fill(~alive, 0.0)
        rows = alive.nonzero()[:, 0]
        self.tokens[rows, self.steps[rows]] = prev[rows]
        if self.attention is not None:
            cpu_rows = rows.cpu()
            self.attention[cpu_rows, self.steps[rows].cpu(), : attn.size(1)] = (
                attn[rows].float().cpu()
            )
        self.steps = self.steps + alive.long()
        self.prev = prev
        ended = (alive & (prev == eos)).nonzero()[:, 0].tolist()
        results = [(self.tags[i], [self._hypothesis(i)]) for i in ended]
        if ended:
            self._retire(ended)
        return results

    def _hypothesis(self, i: int) -> Hypothesis:
        length = int(self.steps[i]) - 1
        attn = None
        if self.attention is not None:
            attn = self.attention[i, : length + 1, : self.src_lengths[i]].float().clone()
        score = float(self.total[i])
        return Hypothesis(self.tokens[i, :length].tolist(), score, score, attn)


@dataclass
class _Table:
    """Per sentence: K hypotheses (live beams or finished ones) in fixed-size buffers.

    Attributes:
        tokens: (B, K, L) long.
        scores: (B, K) cumulative log-probs (beams) or normalised scores (finished).
        attention: (B, K, L + 1, S) or None.
        lengths: (B, K) long, tokens of each finished hypothesis (unused for beams).
        log_probs: (B, K) total log-probs of finished hypotheses (unused for beams).
    """

    tokens: Tensor
    scores: Tensor
    attention: Tensor | None
    lengths: Tensor
    log_probs: Tensor

    def rows(self, keep: Tensor) -> _Table:
        attention = None if self.attention is None else self.attention[keep]
        return _Table(
            self.tokens[keep],
            self.scores[keep],
            attention,
            self.lengths[keep],
            self.log_probs[keep],
        )

    def joined(self, other: _Table) -> _Table:
        return _Table(
            cat_rows(self.tokens, other.tokens, [2], 0),
            torch.cat([self.scores, other.scores]),
            cat_rows(self.attention, other.attention, [2, 3], 0.0),
            torch.cat([self.lengths, other.lengths]),
            torch.cat([self.log_probs, other.log_probs]),
        )


def _empty_table(
    n: int, k: int, longest: int, width: int, attention: bool, device: torch.device
) -> _Table:
    return _Table(
        tokens=torch.zeros(n, k, longest, dtype=torch.long, device=device),
        scores=torch.full((n, k), NEG_INF, device=device),
        attention=torch.zeros(n, k, longest + 1, width, device=device) if attention else None,
        lengths=torch.zeros(n, k, dtype=torch.long, device=device),
        log_probs=torch.full((n, k), NEG_INF, device=device),
    )


class LiveBeam(LiveSearch[TagT]):
    """`beam.beam_search` over a live batch: each sentence at its own step."""

    def __init__(self, model: Searchable, settings: LiveSettings, device: torch.device) -> None:
        super().__init__(model, settings, device)
        k = settings.beam_size
        self.beams = _empty_table(0, k, 1, 1, settings.attention, device)
        self.finished = _empty_table(0, k, 1, 1, settings.attention, device)

    def _add_rows(self, budget: Tensor, width: int) -> None:
        n, k, s = budget.numel(), self.settings.beam_size, self.settings
        longest = int(budget.max()) + 1
        beams = _empty_table(n, k, longest, width, s.attention, self.device)
        beams.scores[:, 0] = 0.0  # one empty hypothesis, the other slots empty
        finished = _empty_table(n, k, longest, width, s.attention, self.device)
        if not self.beams.scores.size(0):
            # An emptied batch starts afresh: its tables' old source width would
            # outlast its encoder output's and no longer match the attention rows.
            self.beams, self.finished = beams, finished
            return
        self.beams = self.beams.joined(beams)
        self.finished = self.finished.joined(finished)

    def _select(self, keep: Tensor) -> None:
        self.beams, self.finished = self.beams.rows(keep), self.finished.rows(keep)

    def step(self) -> list[tuple[TagT, list[Hypothesis]]]:
        """One decoding step of every sentence; returns those it finished, n-best each."""
        if not self.tags:
            return []
        s, k = self.settings, self.settings.beam_size
        at_budget = self.steps >= self.budget
        row_best, row_tokens, state, attn = next_tokens(
            self.model,
            self._last_tokens(),
            self.state,
            self.enc,
            width=k + 1,
            eos_id=s.eos_id,
            must_end=at_budget.repeat_interleave(k),
            beam_scores=self.beams.scores,
        )
        candidates = _top_candidates(self.beams.scores, row_best, row_tokens)
        step_attn = (
            None if self.beams.attention is None else attn.float().view(len(self.tags), k, -1)
        )
        self._finalise(candidates, step_attn)
        parents = self._advance(candidates, step_attn)
        self.steps = self.steps + 1
        penalty = self._penalties(self.steps)
        best_live = self.beams.scores.max(dim=1).values / penalty
        done = (best_live <= self.finished.scores[:, -1]) | at_budget
        self.state = state.select(_flat_rows(parents))
        ended = [i for i, d in enumerate(done.tolist()) if d and not self.answered[i]]
        results = [(self.tags[i], self._hypotheses(i)) for i in ended]
        if ended:
            # A -inf beam adds nothing to its sentence's finished set while it waits.
            self.beams.scores[torch.tensor(ended, device=self.device)] = NEG_INF
            self._retire(ended)
        return results

    def _penalties(self, lengths: Tensor) -> Tensor:
        """(B,) float32 GNMT penalty of each sentence at its length (as search's scalar)."""
        alpha = self.settings.alpha
        values = [length_penalty(n, alpha) for n in lengths.tolist()]
        return torch.tensor(values, dtype=torch.float64, device=self.device).float()

    def _last_tokens(self) -> Tensor:
        """(B*K,) BOS for a sentence at its first step, else each beam's last token."""
        # A frozen sentence keeps counting steps past its buffer: its tokens are unread.
        last = (self.steps - 1).clamp(min=0, max=self.beams.tokens.size(2) - 1)
        index = last[:, None, None].expand(-1, self.settings.beam_size, 1)
        tokens = self.beams.tokens.gather(2, index)[:, :, 0]
        tokens = tokens.masked_fill((self.steps == 0)[:, None], self.settings.bos_id)
        return tokens.reshape(-1)

    def _with_step(self, history: Tensor | None, step: Tensor | None, origin: Tensor) -> Any:
        """The parents' attention rows with this step's row written at each sentence's
        own position: (B, K, L + 1, S)."""
        if history is None or step is None:
            return None
        rows = _pick(history, origin)
        at = self.steps.clamp(max=rows.size(2) - 1)
        batch = torch.arange(rows.size(0), device=rows.device)[:, None]
        rows[batch, torch.arange(origin.size(1)), at[:, None]] = _pick(step, origin)
        return rows

    def _finalise(self, candidates: Any, step_attn: Tensor | None) -> None:
        """EOS candidates among the top K join the finished set (`beam._finalise`)."""
        s, k = self.settings, self.settings.beam_size
        origin = candidates.beams[:, :k]
        log_probs = candidates.scores[:, :k]
        ends = (candidates.tokens[:, :k] == s.eos_id) & torch.isfinite(log_probs)
        if not bool(ends.any()):
            return
        penalty = self._penalties(self.steps + 1)[:, None]
        new = _Table(
            tokens=_pick(self.beams.tokens, origin),
            scores=log_probs.masked_fill(~ends, NEG_INF) / penalty,
            attention=self._with_step(self.beams.attention, step_attn, origin),
            lengths=self.steps[:, None].expand(-1, k),
            log_probs=log_probs,
        )
        old = self.finished
        scores, index = torch.cat([old.scores, new.scores], dim=1).topk(k, dim=1)

        def merge(a: Tensor, b: Tensor) -> Tensor:
            return _pick(torch.cat([a, b], dim=1), index)

        attention = None
        if old.attention is not None and new.attention is not None:
            attention = merge(old.attention, new.attention)
        self.finished = _Table(
            merge(old.tokens, new.tokens),
            scores,
            attention,
            merge(old.lengths, new.lengths),
            merge(old.log_probs, new.log_probs),
        )

    def _advance(self, candidates: Any, step_attn: Tensor | None) -> Tensor:
        """The first K non-EOS candidates become the beams (`beam._advance`); returns
        their parents."""
        s, k = self.settings, self.settings.beam_size
        width = candidates.scores.size(1)
        is_eos = candidates.tokens == s.eos_id
        rank = torch.arange(width, device=is_eos.device) + is_eos.long() * width
        keep = rank.topk(k, dim=1, largest=False).indices
        origin = candidates.beams.gather(1, keep)
        tokens = candidates.tokens.gather(1, keep)
        scores = candidates.scores.gather(1, keep).masked_fill(tokens == s.eos_id, NEG_INF)
        history = _pick(self.beams.tokens, origin)
        at = self.steps.clamp(max=history.size(2) - 1)[:, None, None].expand(-1, k, 1)
        history.scatter_(2, at, tokens[:, :, None])
        attention = self._with_step(self.beams.attention, step_attn, origin)
        self.beams = replace(self.beams, tokens=history, scores=scores, attention=attention)
        return origin

    def _hypotheses(self, i: int) -> list[Hypothesis]:
        """Sentence ``i``'s best ``nbest`` finished hypotheses (`beam._beam_hypotheses`)."""
        f = self.finished
        scores, lengths = f.scores[i].tolist(), f.lengths[i].tolist()
        log_probs = f.log_probs[i].tolist()
        hyps = []
        for j in range(self.settings.nbest):
            if scores[j] == NEG_INF:
                break
            attn = None
            if f.attention is not None:
                attn = f.attention[i, j, : lengths[j] + 1, : self.src_lengths[i]].float().cpu()
            tokens = f.tokens[i, j, : lengths[j]].tolist()
            hyps.append(Hypothesis(tokens, scores[j], log_probs[j], attn))
        return hyps


def live_search(
    model: Searchable, settings: LiveSettings, device: torch.device
) -> LiveGreedy[Any] | LiveBeam[Any]:
    """Greedy for beam 1 with one hypothesis (as `Translator` chooses), else beam search."""
    if settings.beam_size == 1 and settings.nbest == 1:
        return LiveGreedy(model, settings, device)
    return LiveBeam(model, settings, device)
