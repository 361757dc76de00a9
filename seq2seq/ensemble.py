"""Several trained models decoding as one: the search API over their average.

Why average log-probabilities: each step the ensemble scores token ``y`` with
the mean of its members' log-probs, i.e. the normalised geometric mean of their
distributions (as Nematus and Marian ensemble). Independently trained members
make different mistakes, and a token only wins when most members agree on it,
so a small ensemble typically gains more BLEU than any single-model recipe
change of the same cost. Search renormalises the scores it keeps, so the
averaged log-probs serve as its logits.

The members must share one target vocabulary; each keeps its own encoder
output and decoder state, carried together as `Members` so that search picks
and reorders rows for all of them at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from seq2seq.model import Seq2Seq

__all__ = ["Ensemble", "Members"]


@dataclass(frozen=True)
class Members:
    """One encoder output or decoder state per member, selected in step."""

    parts: tuple[Any, ...]

    def select(self, index: Tensor) -> Members:
        """Rows ``index`` of every member's batch (how search reorders beams)."""
        return Members(tuple(part.select(index) for part in self.parts))


class Ensemble(nn.Module):
    """Members behind the same search API as one `Seq2Seq`."""

    def __init__(self, members: Sequence[Seq2Seq]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        vocabularies = {m.decoder.generator.out_features for m in members}
        if len(vocabularies) != 1:
            raise ValueError(f"ensemble members have different target vocabularies: {vocabularies}")
        self.members = nn.ModuleList(members)

    def encode(self, src: Tensor, src_lengths: Tensor) -> Members:
        return Members(tuple(m.encode(src, src_lengths) for m in self.members))

    def init_state(self, enc: Members) -> Members:
        return Members(tuple(m.init_state(e) for m, e in zip(self.members, enc.parts, strict=True)))

    def decode_step(
        self, prev_tokens: Tensor, state: Members, enc: Members
    ) -> tuple[Tensor, Members, Tensor]:
        """One step of every member: mean log-probs (N, V), their states, and the
        mean of their attention weights (N, S)."""
        log_probs, states, weights = [], [], []
        for model, s, e in zip(self.members, state.parts, enc.parts, strict=True):
            logits, new_state, attn = model.decode_step(prev_tokens, s, e)
            log_probs.append(torch.log_softmax(logits.float(), dim=-1))
            states.append(new_state)
            weights.append(attn.float())
        mean = torch.stack(log_probs).mean(0)
        return mean, Members(tuple(states)), torch.stack(weights).mean(0)
