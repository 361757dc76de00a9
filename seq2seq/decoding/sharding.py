"""Translating one input in several processes: contiguous line ranges, joined in order.

Why contiguous ranges: each process's output is then a contiguous piece of the
single-process output (one result per input line, n-best indices counted over
the whole input), so joining the pieces in shard order gives the same bytes. The
line count comes from a first pass over the input (fast: bytes, no decoding), so
every process finds its range without talking to the others.

Two ways in: under torchrun, process ``r`` of ``N`` translates shard ``r + 1`` into a
part file beside the output, and rank 0 joins the parts once all are written;
with ``shard=K/N`` (a scheduler's job array, no torchrun) the run writes
shard ``K``'s output only, and the user joins the N outputs in order (``cat``).
"""

from __future__ import annotations

import gzip
import itertools
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from seq2seq.runtime import distributed
from seq2seq.runtime.distributed import World
from seq2seq.runtime.fs import replace_bytes_on_success


@dataclass(frozen=True)
class Shard:
    """The ``number``-th (1-based) of ``count`` contiguous line ranges of an input."""

    number: int
    count: int

    def span(self, total: int) -> tuple[int, int]:
        """0-based ``[start, stop)`` of this shard in an input of ``total`` lines; sizes
        differ by at most one line."""
        k = self.number - 1
        return k * total // self.count, (k + 1) * total // self.count

    def part(self, path: str) -> str:
        """The file this shard's output goes to before rank 0 joins the parts."""
        file = Path(path).expanduser()
        return str(file.with_name(f"{file.name}.part-{self.number:05d}-of-{self.count:05d}"))


def parse_shard(text: str) -> Shard:
    """``"K/N"`` (1 <= K <= N) as a Shard.

    Raises:
        ValueError: naming the option and the expected form.
    """
    number, _, count = str(text).partition("/")
    try:
        shard = Shard(int(number), int(count))
    except ValueError:
        shard = Shard(0, 0)
    if not 1 <= shard.number <= shard.count:
        raise ValueError(f"shard={text!r}; expected K/N with 1 <= K <= N, e.g. shard=1/4")
    return shard


def count_lines(path: str) -> int:
    """Lines of ``path`` as the translator reads them (``*.gz`` decompressed): "\\n"
    ends a line, and a last line without one still counts."""
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"input file not found: {file}")
    if not file.is_file() and not os.path.samefile(file, os.devnull):
        raise ValueError(
            f"input {file} is not a regular file: a sharded translation reads its input "
            "twice (to count its lines first), which a pipe or a device cannot give"
        )
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rb") as handle:
        return sum(1 for _ in handle)


@dataclass(frozen=True)
class Plan:
    """Which input lines this process translates and where its results go.

    Attributes:
        start: 0-based number of the first input line (n-best indices start here).
        stop: one past the last line, or None for all.
        output: this process's output file (None: stdout).
        alignments: this process's alignments file, if any.
        parts: the shard the part files belong to, when rank 0 joins them afterwards.
    """

    start: int = 0
    stop: int | None = None
    output: str | None = None
    alignments: str | None = None
    parts: Shard | None = None

    def select(self, lines: Iterable[str]) -> Iterator[str]:
        """This process's lines of the whole input."""
        return itertools.islice(lines, self.start, self.stop)


def plan(
    shard: str | None,
    world: World,
    *,
    input: str | None,
    output: str | None,
    alignments: str | None,
) -> Plan:
    """This process's share of the input: all of it, the ``shard=K/N`` option's
    range, or under torchrun the range of its rank.

    Raises:
        ValueError: a sharded run without an input file, or under torchrun without
            an output file or together with ``shard``.
    """
    if shard is None and not world.distributed:
        return Plan(output=output, alignments=alignments)
    if shard is not None and world.distributed:
        raise ValueError(f"shard={shard} splits the input for a job without torchrun; drop it")
    if input is None:
        raise ValueError("a sharded translation reads input=FILE (stdin cannot be split)")
    if world.distributed and output is None:
        raise ValueError("under torchrun, pass output=FILE (the processes cannot share stdout)")
    mine = parse_shard(shard) if shard is not None else Shard(world.rank + 1, world.size)
    start, stop = mine.span(count_lines(input))
    if not world.distributed:
        return Plan(start, stop, output=output, alignments=alignments)
    assert output is not None
    return Plan(
        start,
        stop,
        output=mine.part(output),
        alignments=mine.part(alignments) if alignments else None,
        parts=mine,
    )


def join_parts(plan: Plan, *, output: str | None, alignments: str | None) -> None:
    """Under torchrun, wait for every process, then rank 0 joins the part files in
    order into ``output`` (and ``alignments``) and deletes them."""
    if plan.parts is None:
        return
    distributed.barrier()
    if not distributed.current().is_main:
        return
    count = plan.parts.count
    for target in (output, alignments):
        if target is not None:
            parts = [Shard(k, count).part(target) for k in range(1, count + 1)]
            concatenate([Path(p) for p in parts], Path(target).expanduser())


def concatenate(parts: list[Path], target: Path) -> None:
    """``target`` = the ``parts`` joined in order, written atomically; the parts are
    deleted once it is in place."""
    with replace_bytes_on_success(target) as out:
        for part in parts:
            with part.open("rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
    for part in parts:
        part.unlink()
