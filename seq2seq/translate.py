"""``seq2seq-translate``: a model bundle and input lines -> one output line per input line.

Usage::

    seq2seq-translate model=BUNDLE [input=FILE] [output=FILE] [decode.beam_size=5]
        [decode.batch_size=64] [decode.nbest=3] [scores=true] [alignments=FILE]
        [attention_plot=DIR] [errors=replace] [device=cpu] [threads=4]

``input`` defaults to stdin (``*.gz`` files are decompressed), ``output`` to stdout.
Decoding settings come from this command's config (``conf/translate.yaml`` plus
overrides), never from the bundle. Input must be UTF-8: an invalid byte sequence
stops the run with ``error: FILE:LINE: ...`` on stderr and exit code 2, unless
``errors=replace`` (invalid bytes become U+FFFD).

Output formats (UTF-8, "\\n" line ends, tab-separated; stdout carries nothing else):

* default: one translation per input line, in input order;
* ``scores=true``: ``translation<TAB>score`` per input line;
* ``decode.nbest=N`` with N > 1: up to N lines per input line, best first, each
  ``index<TAB>translation<TAB>score`` where ``index`` is the 0-based input line
  number (as in Moses n-best lists); fewer than N lines when the search finds fewer
  distinct translations; ``scores`` is implied.

``score`` is the search's ranking score, printed with 4 decimals: the GNMT
length-normalised log-prob with beam search, the plain log-prob with greedy
search (``decode=greedy`` or beam size 1). An empty or whitespace-only input line
(NUL characters count as whitespace) is not translated: it gives an empty
translation with score 0 (one n-best line).

``alignments=FILE`` writes JSON lines, one per input line, for the best translation::

    {"src_pieces": [...], "tgt_pieces": [..., "</s>"], "attention": [[...], ...]}

with one ``attention`` row per target piece (EOS included) and one column per
source piece (after truncation to ``decode.max_input_tokens``); empty input lines
give empty lists. ``attention_plot=DIR`` draws the same matrices as
``DIR/000001.png``, ... named by the 1-based input line number (no file for empty
lines); it needs matplotlib (``pip install seq2seq[plot]``).

A progress bar (sentences/s) and log messages go to stderr; nothing is written
into the current directory. ``output`` and ``alignments`` must not be the input or
a file of the bundle (refused before anything is read), and appear only when the
run succeeds: a failed run leaves an existing file as it was.

Several processes: ``torchrun --standalone --nproc-per-node=N -m seq2seq.translate
model=... input=FILE output=FILE`` splits the input into N contiguous line ranges,
each process translates one into a part file, and rank 0 joins the parts: the
output is byte for byte the single-process one. ``shard=K/N`` (no torchrun)
translates only the K-th range, for job arrays; join the N outputs in order
(``cat out.1 ... out.N > out``). See `seq2seq.decoding.sharding`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from seq2seq._hydra import expected_errors, register_configs, run_hydra, to_app
from seq2seq.config import TranslateApp, conf_dir
from seq2seq.data.text import TextError, iter_lines
from seq2seq.decoding import plotting, sharding
from seq2seq.decoding.translator import TextHypothesis, Translator
from seq2seq.runtime import distributed
from seq2seq.runtime.device import pick_device
from seq2seq.runtime.fs import check_outputs, files_under, replace_on_success

register_configs()
logger = logging.getLogger("seq2seq.translate")

EMPTY_SCORE = 0.0  # printed for an untranslated empty input line
# Under torchrun, how long (seconds) rank 0 waits at the end for the slowest
# process's share before joining the parts: as long as translating a share may take.
SHARD_WAIT = 7 * 24 * 3600.0


class InputError(TextError):
    """The input cannot be read: missing file, invalid UTF-8, corrupt gzip."""

    utf8_hint = "fix the input or pass errors=replace"


# ------------------------------------------------------------------------------- input


def read_input(path: str | None, *, errors: str = "strict") -> Iterator[str]:
    """Lines of ``path`` (stdin when None), read lazily by ``seq2seq.data.text``."""
    return iter_lines(path, errors=errors, what="input file", error=InputError)


# ------------------------------------------------------------------------------ output


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
def _open_output(path: str | None) -> Iterator[TextIO]:
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


# --------------------------------------------------------------------------------- app


def run(config: TranslateApp) -> int:
    """Translate ``config.input`` into ``config.output``; returns the number of input lines."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    if config.attention_plot:
        plotting.require_matplotlib()
    check_outputs(
        {"output": config.output, "alignments": config.alignments},
        {"input": config.input, **files_under(config.model)},
    )
    world = distributed.current()
    share = sharding.plan(
        config.shard,
        world,
        input=config.input,
        output=config.output,
        alignments=config.alignments,
    )
    device = str(pick_device(config.device, local_rank=world.local_rank))
    translator = Translator.from_bundle(config.model, decode=config.decode, device=device)
    lines = share.select(read_input(config.input, errors=str(config.errors)))
    attention = bool(config.alignments or config.attention_plot)
    start, count = time.perf_counter(), 0
    with ExitStack() as stack:
        sinks = Sinks(
            out=stack.enter_context(_open_output(share.output)),
            nbest=config.decode.nbest,
            scores=config.scores,
            alignments=stack.enter_context(_open_output(share.alignments))
            if share.alignments
            else None,
            plot_dir=Path(config.attention_plot).expanduser() if config.attention_plot else None,
        )
        bar = stack.enter_context(
            tqdm(
                desc="translate",
                unit="sent",
                file=sys.stderr,
                delay=1.0,
                dynamic_ncols=True,
                disable=not world.is_main,
            )
        )
        stream = translator.translate_stream(
            lines, chunk_size=config.chunk_size, attention=attention
        )
        for count, hyps in enumerate(stream, start=1):
            sinks.write(share.start + count - 1, hyps)
            bar.update()
    sharding.join_parts(share, output=config.output, alignments=config.alignments)
    elapsed = time.perf_counter() - start
    logger.info("translated %d lines in %.1fs (%.1f lines/s)", count, elapsed, count / elapsed)
    return count


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="translate")
def _app(cfg: DictConfig) -> None:
    with expected_errors():
        config = to_app(cfg, TranslateApp, required={"model": "BUNDLE"})
        with distributed.process_group(backend="gloo", timeout=SHARD_WAIT):
            run(config)


def main() -> None:
    """Console entry point: ``seq2seq-translate``."""
    run_hydra(_app)


if __name__ == "__main__":
    main()
