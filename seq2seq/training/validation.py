"""Scoring the model being trained: validation loss, perplexity and greedy BLEU.

Why greedy BLEU through the `Translator`: it is what a user of the bundle gets
(same detokenisation, same batching), at the cost of the cheapest search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq.config import TrainApp
from seq2seq.data.batching import Pair, collate, token_batches
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.decoding.translator import Translator
from seq2seq.metrics import bleu
from seq2seq.model.model import Seq2Seq
from seq2seq.training import snapshots


@dataclass(frozen=True)
class ValidSet:
    """The validation split: encoded pairs for the loss, text for BLEU."""

    pairs: list[Pair]
    src: list[str]
    ref: list[str]


@dataclass(frozen=True)
class Scores:
    loss: float  # per target token
    ppl: float
    bleu: float


def validate(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    valid: ValidSet,
    config: TrainApp,
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[object]],
) -> Scores:
    """Validation loss, perplexity and greedy BLEU (detokenised sacreBLEU)."""
    model.eval()
    total, tokens = 0.0, 0
    lengths = [(len(s), len(t) + 1) for s, t in valid.pairs]
    with torch.inference_mode(), autocast():
        for idx in token_batches(lengths, max_tokens=config.train.max_tokens):
            batch = collate([valid.pairs[i] for i in idx]).to(device)
            loss, n = model.loss(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out)
            total, tokens = total + float(loss), tokens + n
    mean = total / max(1, tokens)
    translator = Translator(model, tokenizer, config.decode, device=device)
    score = greedy_bleu(translator, valid.src, valid.ref, limit=config.train.valid_max_sentences)
    return Scores(loss=mean, ppl=math.exp(min(mean, 50.0)), bleu=score)


def greedy_bleu(translator: Translator, src: list[str], ref: list[str], *, limit: int) -> float:
    """Greedy BLEU on the first ``limit`` sentences (all when 0): what validation tracks."""
    limit = limit or len(src)
    greedy_translator = translator.with_decode(beam_size=1, nbest=1)
    return bleu(greedy_translator.translate(src[:limit]), ref[:limit])


@contextmanager
def averaged(model: Seq2Seq, files: list[Path]) -> Iterator[None]:
    """The model holds the mean of the snapshot ``files`` inside the block, and the
    trained weights again after it, so ``last`` stays what training reached."""
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    snapshots.load_average(model, files)
    try:
        yield
    finally:
        model.load_state_dict(trained)
