"""Metrics records: what ``metrics.jsonl`` holds, one JSON object a line.

Why typed: the trainer writes them, the app's progress bar draws them, an
ensemble adds its own, and the run directory reads them back to decide
whether work would be lost. One dataclass per ``kind`` makes a misspelt field a
type error instead of a ``KeyError`` at the end of a long run.

The file is appended to as training goes (a kill can tear its last line, which
readers skip); every bundle keeps a copy of the records that led to it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from seq2seq.model import bundle as bundle_io
from seq2seq.runtime import fs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRecord:
    """Loss per target token and target tokens/s of a logging window, all processes."""

    step: int
    epoch: int
    elapsed: float
    loss: float
    tokens_per_s: float
    lr: float
    world_size: int = 1
    kind: Literal["train"] = "train"


@dataclass(frozen=True)
class ValidRecord:
    """One validation: loss, perplexity and greedy BLEU, and the best BLEU so far."""

    step: int
    epoch: int
    elapsed: float
    loss: float
    ppl: float
    bleu: float
    best_bleu: float
    kind: Literal["valid"] = "valid"


@dataclass(frozen=True)
class AverageRecord:
    """The validation of the mean of the last ``snapshots`` snapshots."""

    step: int
    epoch: int
    elapsed: float
    snapshots: int
    loss: float
    ppl: float
    bleu: float
    best_bleu: float
    kind: Literal["average"] = "average"


@dataclass(frozen=True)
class EnsembleRecord:
    """The validation BLEU of an ensemble of ``members`` trained models."""

    members: int
    bleu: float
    elapsed: float
    kind: Literal["ensemble"] = "ensemble"


@dataclass(frozen=True)
class DataRecord:
    """What became of the training split's rows when its token store was built:
    rows read, bad rows skipped (the first few named), pairs dropped as empty or
    by the length filters, and pairs kept."""

    step: int
    epoch: int
    elapsed: float
    lines: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = dataclasses.field(default_factory=list)
    empty: int = 0
    filtered: int = 0
    pairs: int = 0
    split: str = "train"
    kind: Literal["data"] = "data"


Record = TrainRecord | ValidRecord | AverageRecord | EnsembleRecord | DataRecord
StepRecord = TrainRecord | ValidRecord | AverageRecord
KINDS: dict[str, type[Record]] = {
    "train": TrainRecord,
    "valid": ValidRecord,
    "average": AverageRecord,
    "ensemble": EnsembleRecord,
    "data": DataRecord,
}


class Reporter(Protocol):
    """Where progress goes; the app draws it, the library only calls it."""

    def on_step(self, step: int, loss: float, tokens_per_s: float) -> None: ...

    def on_record(self, record: Record) -> None: ...


def to_json(record: Record) -> dict[str, Any]:
    """The record as the JSON object written to ``metrics.jsonl`` (``kind`` first)."""
    fields = dataclasses.asdict(record)
    return {"kind": fields.pop("kind"), **fields}


def from_json(raw: Any) -> Record | None:
    """A record read back, or None for a line that is no record of a known kind
    (missing fields, or a kind this version does not know)."""
    cls = KINDS.get(str(raw.get("kind"))) if isinstance(raw, dict) else None
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in names})
    except TypeError:
        return None


def read(path: str | Path) -> list[Record]:
    """The records of a run directory or a bundle (a torn last line is skipped)."""
    parsed = (from_json(raw) for raw in bundle_io.load_metrics(path))
    return [r for r in parsed if r is not None]


def lines(records: list[Record]) -> str:
    return "".join(json.dumps(to_json(r)) + "\n" for r in records)


def append(run_dir: Path, record: Record) -> None:
    """Append one record to ``run_dir/metrics.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / bundle_io.METRICS, "a") as f:
        f.write(lines([record]))
    logger.debug("%s", record)  # metrics.jsonl is the record; the terminal gets the reporter


def rewrite(run_dir: Path, records: list[Record]) -> None:
    """Replace ``run_dir/metrics.jsonl`` with ``records`` (atomically)."""
    fs.write_bytes(run_dir / bundle_io.METRICS, lines(records).encode())


def records_until(run_dir: Path, checkpoint: Path, step: int) -> list[Record]:
    """The records of a run resumed at ``step``: the run's own up to that step, or,
    when they fall short of what the checkpoint saw (it was recovered from a
    temporary copy whose records never reached the run's file), the checkpoint's."""
    kept: list[Record] = [r for r in _by_step(read(run_dir)) if r.step <= step]
    saved = read(checkpoint)
    if kept[: len(saved)] == saved:
        return kept
    return saved + [r for r in _by_step(kept) if r.step == step and r not in saved]


def _by_step(records: list[Record]) -> list[StepRecord]:
    return [r for r in records if isinstance(r, TrainRecord | ValidRecord | AverageRecord)]


def recorded_best_bleu(run_dir: Path) -> float:
    """The validation BLEU of the model in ``best/`` (-1 when there is none)."""
    path = run_dir / "best"
    if not path.is_dir():
        return -1.0
    scores = [r.best_bleu for r in read(path) if isinstance(r, ValidRecord | AverageRecord)]
    return max(scores, default=-1.0)


def lost_checkpoint(run_dir: Path) -> bool:
    """Whether the run got past its first checkpoint, though none is left now.

    Every regular validation appends its record and then writes ``last/``; a
    second validation step on record therefore means the first checkpoint was
    complete, and a restart from step 0 would silently discard that work.
    """
    return len({r.step for r in read(run_dir) if isinstance(r, ValidRecord)}) >= 2
