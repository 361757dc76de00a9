"""Ensemble members trained side by side, each in a process of its own.

Why processes: a GRU of this toolkit's sizes keeps one core busy but gains little
from a second one (its matrices are too small to split well), so on a machine of
N cores N members with one core each train many more steps in the same time than
members trained one after another with all cores (figures in docs/benchmarks.md).
A member that fails leaves the others to finish. Each member is an ordinary run in its
own directory, as in the sequential case, so resume and the record of finished
members work the same.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from seq2seq.config import TrainApp
from seq2seq.data.store import prepare
from seq2seq.runtime import cores
from seq2seq.training.records import AverageRecord, DataRecord, Record, ValidRecord
from seq2seq.training.trainer import FitResult, Trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One member to train: its number (from 1), configuration and directory."""

    number: int
    config: TrainApp
    run_dir: Path


class MemberFailed(ValueError):
    """A member's process ended with an error (written to stderr by the member)."""


def train(
    config: TrainApp,
    members: Sequence[Member],
    *,
    write_result: Callable[[Member, FitResult], None],
) -> None:
    """Train ``members`` ``train.ensemble_parallel`` at a time; ``write_result``
    records a finished member (called in its process, so it must be picklable).

    Why waves with an even share of the time left: ``max_time`` stays the whole
    run's budget, and a wave that ends early leaves its time to the next.
    """
    if not members:
        return
    t = config.train
    at_once = t.ensemble_parallel
    threads = t.threads or max(1, cores() // at_once)
    # Tokenizer and token store are built once here; the members find them cached.
    prepare(config.data, config.tokenizer)
    waves = [members[i : i + at_once] for i in range(0, len(members), at_once)]
    spent = 0.0
    for k, wave in enumerate(waves):
        budget = max(1.0, (t.max_time - spent) / (len(waves) - k)) if t.max_time else 0.0
        start = time.monotonic()
        _run_wave(wave, threads=threads, max_time=budget, write_result=write_result)
        spent += time.monotonic() - start


def _run_wave(
    wave: Sequence[Member],
    *,
    threads: int,
    max_time: float,
    write_result: Callable[[Member, FitResult], None],
) -> None:
    """Start every member of ``wave`` in a fresh (spawned) process and wait for all."""
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    processes = []
    for member in wave:
        t = replace(member.config.train, threads=threads, max_time=max_time)
        job = replace(member, config=replace(member.config, train=t))
        process = context.Process(
            target=_member_main,
            args=(job, write_result, logging.getLogger().level),
            name=f"member{member.number}",
        )
        process.start()
        logger.info("ensemble member %d: pid %d, %d threads", member.number, process.pid, threads)
        processes.append((member, process))
    failed = []
    for member, process in processes:
        process.join()
        if process.exitcode != 0:
            failed.append(f"{member.number} (exit code {process.exitcode})")
    if failed:
        raise MemberFailed(
            f"ensemble member {', '.join(failed)} failed (see its error above); started "
            f"again, the run resumes from the members' checkpoints"
        )


def _member_main(
    member: Member, write_result: Callable[[Member, FitResult], None], level: int
) -> None:
    """A member's process: log to stderr under its name, train, record the result.
    An exception is written as one line and ends the process with code 2."""
    logging.basicConfig(
        level=level,
        format=f"[%(asctime)s][member {member.number}][%(name)s][%(levelname)s] - %(message)s",
        stream=sys.stderr,
    )
    try:
        trainer = Trainer.from_config(
            member.config, run_dir=member.run_dir, reporter=_LogReporter(member.number)
        )
        write_result(member, trainer.fit())
    except KeyboardInterrupt:  # Ctrl-C reaches every member; the parent reports it
        sys.exit(130)
    except Exception as e:  # the parent names the member; its error must not be lost
        print(f"error: ensemble member {member.number}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


class _LogReporter:
    """Progress of a member as log lines: a progress bar per process would garble."""

    def __init__(self, number: int) -> None:
        self.number = number

    def on_step(self, step: int, loss: float, tokens_per_s: float) -> None:
        del step, loss, tokens_per_s  # a member's progress is its validation lines

    def on_record(self, record: Record) -> None:
        if isinstance(record, ValidRecord | AverageRecord):
            logger.info(
                "member %d, step %d: %s loss %.3f ppl %.2f BLEU %.2f",
                *(self.number, record.step, record.kind, record.loss, record.ppl, record.bleu),
            )
        elif isinstance(record, DataRecord) and record.bad_rows:
            logger.info("member %d: skipped %d bad rows", self.number, record.bad_rows)
