"""Several trained models decoding as one: search over their averaged distributions.

Why average log-probabilities: each step the ensemble scores token ``y`` with
the mean of its members' log-probs, i.e. the normalised geometric mean of their
distributions (as Nematus and Marian ensemble). Independently trained members
make different mistakes, and a token only wins when most members agree on it,
so a small ensemble typically gains more BLEU than any single-model recipe
change of the same cost.

The members must share one target vocabulary. `model.ensemble.Ensemble` holds them
as one module (what a bundle loads); `EnsembleInference` searches with them: each member keeps its
own encoder output and decoder state, carried together as `Members` so that search
picks and reorders rows for all of them at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from seq2seq.decoding import inference
from seq2seq.model.ensemble import Ensemble
from seq2seq.model.model import Seq2Seq
from seq2seq.model.softmax import FullScores

__all__ = ["EnsembleInference", "Members", "for_search"]


@dataclass(frozen=True)
class Members:
    """One encoder output or decoder state per member, selected in step."""

    parts: tuple[Any, ...]

    def select(self, index: Tensor) -> Members:
        """Rows ``index`` of every member's batch (how search reorders beams)."""
        return Members(tuple(part.select(index) for part in self.parts))


def for_search(ensemble: Ensemble) -> EnsembleInference:
    """Each member frozen for search (``inference.build``), averaged."""
    return EnsembleInference([inference.build(cast(Seq2Seq, m)) for m in ensemble.members])


class EnsembleInference:
    """The members' search steps behind the search API of one model."""

    def __init__(self, members: Sequence[inference.Inference]) -> None:
        self.members = list(members)

    def encode(self, src: Tensor, src_lengths: Tensor) -> Members:
        return Members(tuple(m.encode(src, src_lengths) for m in self.members))

    def init_state(self, enc: Members) -> Members:
        parts = zip(self.members, enc.parts, strict=True)
        return Members(tuple(m.init_state(e) for m, e in parts))

    def step(
        self, prev_tokens: Tensor, state: Members, enc: Members
    ) -> tuple[FullScores, Members, Tensor]:
        """One step of every member: the mean of their log-probs (N, V), their states,
        and the mean of their attention weights (N, S)."""
        log_probs, states, weights = [], [], []
        for member, s, e in zip(self.members, state.parts, enc.parts, strict=True):
            scores, new_state, attn = member.step(prev_tokens, s, e)
            log_probs.append(scores.log_probs())
            states.append(new_state)
            weights.append(attn.float())
        mean = torch.stack(log_probs).mean(0)
        return FullScores(mean), Members(tuple(states)), torch.stack(weights).mean(0)
