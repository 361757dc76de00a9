"""What a training run is built from: tokenizer, token store, validation split, model.

Why in this order: the tokenizer is the checkpoint's when resuming (a cached
one trained again could differ), the token store is keyed by the data and the
tokenizer, and the model's vocabulary sizes come from the tokenizer. The
model is seeded here, so a run's initial weights depend on ``train.seed`` alone.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from seq2seq.config import TrainApp
from seq2seq.data.batching import encode_pairs
from seq2seq.data.corpus import load_split
from seq2seq.data.store import TokenStore, prepare
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.model.bundle import build_model
from seq2seq.model.model import Seq2Seq
from seq2seq.training.rundir import Run
from seq2seq.training.validation import ValidSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parts:
    """A run's model, tokenizer, training token store and validation split."""

    model: Seq2Seq
    tokenizer: Tokenizer
    store: TokenStore
    valid: ValidSet


def build(config: TrainApp, run: Run) -> Parts:
    """Corpus -> tokenizer (the checkpoint's when resuming) -> token store (both
    cached) -> seeded model; the run directory checks the data and tokenizer are
    the run's before anything is trained on them."""
    t = config.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    prepared = prepare(config.data, config.tokenizer, tokenizer=run.checkpoint_tokenizer())
    tokenizer = prepared.tokenizer
    run.begin(data_key=prepared.data_key, data_digest=prepared.data_digest, tokenizer=tokenizer)
    valid = load_split(config.data, "valid")
    if config.model.share_embeddings and not tokenizer.joint:
        raise ValueError(
            "model.share_embeddings=true needs a joint vocabulary: set tokenizer.joint=true"
        )
    valid_set = ValidSet(
        pairs=encode_pairs(valid["src"], valid["tgt"], tokenizer),
        src=list(valid["src"]),
        ref=list(valid["tgt"]),
    )
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    model = build_model(config.model, tokenizer)
    logger.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return Parts(model=model, tokenizer=tokenizer, store=prepared.store, valid=valid_set)
