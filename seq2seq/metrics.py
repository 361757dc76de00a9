"""Corpus-level BLEU, chrF and TER through sacrebleu: strings in, numbers out.

Scores are only comparable across papers when they come with sacrebleu's signature
(Post, 2018, "A Call for Clarity in Reporting BLEU Scores"), so every `Score` carries one.
The headline number is cased, detokenised BLEU with the ``13a`` tokenizer. ``lowercase``
and ``tokenize`` apply to BLEU only, as in the ``sacrebleu`` command line; chrF and TER use
sacrebleu's defaults so that they stay comparable with published numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric


@dataclass
class Score:
    """One corpus-level metric value with the sacrebleu signature that reproduces it."""

    name: str
    score: float
    signature: str


def corpus_scores(
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    *,
    lowercase: bool = False,
    tokenize: str = "13a",
) -> list[Score]:
    """BLEU, chrF and TER of detokenised hypotheses against one or more reference streams.

    Args:
        hyps: one detokenised hypothesis per line.
        refs: reference streams, each with one line per hypothesis (several streams =
            multiple references per sentence).
        lowercase: case-insensitive BLEU.
        tokenize: sacrebleu tokenizer for BLEU (``13a``, ``intl``, ``char``, ...).

    Raises:
        ValueError: a reference stream has a different number of lines than ``hyps``.
    """
    check_line_counts(hyps, refs)
    metrics: list[Metric] = [BLEU(lowercase=lowercase, tokenize=tokenize), CHRF(), TER()]
    return [_score(metric, hyps, refs) for metric in metrics]


def bleu(hyps: Sequence[str], refs_single_stream: Sequence[str]) -> float:
    """Cased 13a BLEU against a single reference stream: the quick validation number."""
    refs = [refs_single_stream]
    check_line_counts(hyps, refs)
    return float(BLEU().corpus_score(list(hyps), _as_lists(refs)).score)


def check_line_counts(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    """Fail loudly on misaligned files instead of letting sacrebleu score garbage.

    Raises:
        ValueError: no reference stream, a bare string list passed as ``refs``, or a
            reference stream whose line count differs from the hypotheses'.
    """
    if len(refs) == 0:
        raise ValueError("refs must hold at least one reference stream, got none")
    if isinstance(refs, str) or isinstance(refs[0], str):
        raise ValueError(
            "refs must be a list of reference streams (list[list[str]]), got a list of "
            "strings; wrap a single reference stream as [refs]"
        )
    for index, stream in enumerate(refs, start=1):
        if len(stream) != len(hyps):
            raise ValueError(
                f"hypotheses have {len(hyps)} lines but reference {index} has {len(stream)}"
            )


def format_table(scores: list[Score]) -> str:
    """Aligned plain-text table (metric, score, signature) for terminals and logs."""
    rows = [("metric", "score", "signature")]
    rows += [(s.name, f"{s.score:.2f}", s.signature) for s in scores]
    name_width = max(len(row[0]) for row in rows)
    score_width = max(len(row[1]) for row in rows)
    lines = [f"{n:<{name_width}}  {v:>{score_width}}  {sig}" for n, v, sig in rows]
    return "\n".join(lines)


def to_json(scores: list[Score]) -> dict[str, dict[str, float | str]]:
    """JSON-ready mapping ``{metric name: {"score": ..., "signature": ...}}``."""
    return {s.name: {k: v for k, v in asdict(s).items() if k != "name"} for s in scores}


def _score(metric: Metric, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> Score:
    result = metric.corpus_score(list(hyps), _as_lists(refs))
    return Score(name=result.name, score=float(result.score), signature=str(metric.get_signature()))


def _as_lists(refs: Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu indexes and zips the streams; plain lists keep it away from odd sequences."""
    return [list(stream) for stream in refs]
