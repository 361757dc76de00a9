"""Helpers the tests import: tiny seeded models and the repository's paths.

Fixtures live in ``conftest.py`` (pytest loads it as a plugin); plain functions
that tests call live here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from seq2seq.config import ModelConfig
from seq2seq.data.tokenizer import PAD_ID, Tokenizer
from seq2seq.model.model import Seq2Seq

ROOT = Path(__file__).resolve().parents[1]
# Multi30k for the tests that need real data (they skip without it).
MULTI30K = Path(os.environ.get("SEQ2SEQ_MULTI30K", ROOT.parent / "shared" / "data" / "multi30k"))


def tiny_model(
    tokenizer: Tokenizer,
    *,
    seed: int = 0,
    attention: str = "bahdanau",
    cell: str = "gru",
    **sizes: int,
) -> Seq2Seq:
    """A seeded model with hidden 16 (dropout off unless asked for)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        attention=attention,  # type: ignore[arg-type]
        cell=cell,  # type: ignore[arg-type]
        embedding_size=sizes.get("embedding_size", 8),
        hidden_size=sizes.get("hidden_size", 16),
        attention_size=sizes.get("attention_size", 8),
        encoder_layers=sizes.get("encoder_layers", 1),
        decoder_layers=sizes.get("decoder_layers", 1),
        dropout=0.0,
        softmax_head=sizes.get("softmax_head", 0),
    )
    return Seq2Seq.from_config(
        cfg, src_vocab=tokenizer.src_vocab_size, tgt_vocab=tokenizer.tgt_vocab_size, pad_id=PAD_ID
    ).eval()


def lively_model(tokenizer: Tokenizer, *, seed: int = 1, softmax_head: int = 0) -> Seq2Seq:
    """The tiny model with weights scaled up, so outputs differ between inputs.

    With the default small initialisation an untrained model emits one piece for every
    input, which would make order and batching tests pass vacuously.
    """
    model = tiny_model(tokenizer, seed=seed, softmax_head=softmax_head)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    return model
