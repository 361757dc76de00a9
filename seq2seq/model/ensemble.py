"""Several trained models held as one module: what an ensemble bundle saves and loads.

The members must share one target vocabulary, since search averages their
distributions over it (``seq2seq.decoding.ensemble`` does the searching).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from seq2seq.model.model import Seq2Seq

__all__ = ["Ensemble"]


class Ensemble(nn.Module):
    """Trained models that decode together (``decoding.ensemble.for_search`` searches them)."""

    def __init__(self, members: Sequence[Seq2Seq]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        vocabularies = {m.decoder.generator.out_features for m in members}
        if len(vocabularies) != 1:
            raise ValueError(f"ensemble members have different target vocabularies: {vocabularies}")
        self.members = nn.ModuleList(members)
