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

An empty or whitespace-only input line (NUL characters count as whitespace) is
not translated: it gives an empty translation. Output formats (translations,
scores, n-best lists, alignments, attention plots) are described in
`seq2seq.decoding.output`; plots need matplotlib (``pip install seq2seq[plot]``).

A progress bar (sentences/s) and log messages go to stderr; nothing is written
into the current directory. ``output`` and ``alignments`` must not be the input or
a file of the bundle (refused before anything is read), and appear only when the
run succeeds: a failed run leaves an existing file as it was.

Several processes: under ``torchrun`` each translates a contiguous share of the
input and rank 0 joins the parts; ``shard=K/N`` translates only the K-th share,
for job arrays. Either way the joined output is byte for byte the single-process
one (`seq2seq.decoding.sharding`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from seq2seq._hydra import expected_errors, register_configs, run_hydra, to_app
from seq2seq.config import TranslateApp, conf_dir
from seq2seq.data.text import TextError, iter_lines
from seq2seq.decoding import output, plotting, sharding
from seq2seq.decoding.translator import Translator
from seq2seq.runtime import distributed
from seq2seq.runtime.device import pick_device
from seq2seq.runtime.fs import check_outputs, files_under

register_configs()
logger = logging.getLogger("seq2seq.translate")

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
    with (
        output.open_sinks(
            share.output,
            share.alignments,
            config.attention_plot,
            nbest=config.decode.nbest,
            scores=config.scores,
        ) as sinks,
        tqdm(
            desc="translate",
            unit="sent",
            file=sys.stderr,
            delay=1.0,
            dynamic_ncols=True,
            disable=not world.is_main,
        ) as bar,
    ):
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
