"""Where translations go: output lines, alignments and attention plots.

Output formats (UTF-8, "\\n" line ends, tab-separated; stdout carries nothing else):

* default: one translation per input line, in input order;
* ``scores=true``: ``translation<TAB>score`` per input line;
* ``decode.nbest=N`` with N > 1: up to N lines per input line, best first, each
  ``index<TAB>translation<TAB>score`` where ``index`` is the 0-based input line
  number (as in Moses n-best lists); fewer than N lines when the search finds fewer
  distinct translations; ``scores`` is implied.

``score`` is the search's ranking score, printed with 4 decimals: the GNMT
length-normalised log-prob with beam search, the plain log-prob with greedy
search (``decode=greedy`` or beam size 1). An empty input line gives an empty
translation with score 0 (one n-best line).

``alignments=FILE`` writes JSON lines, one per input line, for the best translation::

    {"src_pieces": [...], "tgt_pieces": [..., "</s>"], "attention": [[...], ...]}

with one ``attention`` row per target piece (EOS included) and one column per
source piece (after truncation to ``decode.max_input_tokens``); empty input lines
give empty lists. ``attention_plot=DIR`` draws the same matrices as
``DIR/000001.png``, ... named by the 1-based input line number (no file for empty
lines).

Files appear only when the run succeeds (`seq2seq.runtime.fs`): a failed run
leaves an existing file as it was.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from seq2seq.decoding import plotting
from seq2seq.decoding.translator import TextHypothesis
from seq2seq.runtime.fs import replace_on_success

EMPTY_SCORE = 0.0  # printed for an untranslated empty input line


def format_lines(index: int, hyps: list[TextHypothesis], *, nbest: int, scores: bool) -> list[str]:
    """The output lines (without "\\n") for input line ``index`` (0-based); see module doc."""
    if nbest > 1:
        best = [(h.text, h.score) for h in hyps] or [("", EMPTY_SCORE)]
        return [f"{index}\t{_one_line(text)}\t{score:.4f}" for text, score in best]
    text, score = (hyps[0].text, hyps[0].score) if hyps else ("", EMPTY_SCORE)
    return [f"{_one_line(text)}\t{score:.4f}" if scores else _one_line(text)]


def alignment_record(hyps: list[TextHypothesis]) -> dict[str, list]:
    """JSON-ready pieces and attention of the best hypothesis (empty lists for no input)."""
    if not hyps or hyps[0].attention is None:
        return {"src_pieces": [], "tgt_pieces": [], "attention": []}
    best = hyps[0]
    assert best.attention is not None
    rows = [[round(w, 4) for w in row] for row in best.attention.tolist()]
    return {
        "src_pieces": list(best.src_pieces),
        "tgt_pieces": list(best.tgt_pieces),
        "attention": rows,
    }


def _one_line(text: str) -> str:
    """A translation can never break the one-line-per-input contract (or the TSV columns)."""
    return text.replace("\r", " ").replace("\n", " ").replace("\t", " ")


@dataclass
class Sinks:
    """Everywhere results go: translations, alignments, plots."""

    out: TextIO
    nbest: int
    scores: bool
    alignments: TextIO | None = None
    plot_dir: Path | None = None

    def write(self, index: int, hyps: list[TextHypothesis]) -> None:
        """Write the results of input line ``index`` (0-based)."""
        for line in format_lines(index, hyps, nbest=self.nbest, scores=self.scores):
            self.out.write(line + "\n")
        if self.alignments is not None:
            self.alignments.write(json.dumps(alignment_record(hyps), ensure_ascii=False) + "\n")
        weights = hyps[0].attention if hyps else None
        if self.plot_dir is not None and weights is not None:
            best = hyps[0]
            plotting.plot_attention(
                best.src_pieces,
                best.tgt_pieces,
                weights,
                self.plot_dir / f"{index + 1:06d}.png",
                title=f"line {index + 1}",
            )


@contextmanager
def open_sinks(
    output: str | None,
    alignments: str | None,
    plot_dir: str | None,
    *,
    nbest: int,
    scores: bool,
) -> Iterator[Sinks]:
    """`Sinks` writing to ``output`` (None: stdout), ``alignments`` and ``plot_dir``
    (None: not written); the files replace earlier ones when the block succeeds."""
    with ExitStack() as stack:
        yield Sinks(
            out=stack.enter_context(open_output(output)),
            nbest=nbest,
            scores=scores,
            alignments=stack.enter_context(open_output(alignments)) if alignments else None,
            plot_dir=Path(plot_dir).expanduser() if plot_dir else None,
        )


@contextmanager
def open_output(path: str | None) -> Iterator[TextIO]:
    """``path`` for writing (parents created), or stdout switched to UTF-8.

    A file is written beside ``path`` and renamed over it at the end, so a run
    that fails leaves an existing ``path`` as it was.
    """
    if path is None:
        reconfigure = getattr(sys.stdout, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(encoding="utf-8", errors="strict")
        yield sys.stdout
        sys.stdout.flush()
        return
    with replace_on_success(path) as handle:
        yield handle
