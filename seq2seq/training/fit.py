"""Where every training starts: one model, or an ensemble trained member by member.

Why an ensemble is a sequence of ordinary runs: a member has its own directory,
checkpoints and resume; what an ensemble adds is only the split of the time
budget, the record of finished members and the ensemble bundle at the end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from seq2seq.config import TrainApp, TrainingConfig
from seq2seq.data.corpus import load_split
from seq2seq.decoding.translator import Translator
from seq2seq.model import bundle as bundle_io
from seq2seq.runtime import distributed, fs
from seq2seq.runtime.device import pick_device
from seq2seq.training import records, rundir, side_by_side
from seq2seq.training.records import EnsembleRecord, Reporter
from seq2seq.training.rundir import FIT_RESULT
from seq2seq.training.side_by_side import Member
from seq2seq.training.trainer import FitResult, Trainer
from seq2seq.training.validation import greedy_bleu

logger = logging.getLogger(__name__)

Callback = Callable[[], None]


def fit(
    config: TrainApp,
    *,
    run_dir: Path,
    reporter: Reporter | None = None,
    on_accepted: Callback | None = None,
) -> FitResult:
    """Train one model, or with ``train.ensemble`` > 1 an ensemble (`fit_ensemble`).

    ``on_accepted`` is called once (by rank 0) when the run directory accepted the
    run and training is about to start; a refused run never calls it.
    """
    if config.train.ensemble > 1:
        return fit_ensemble(config, run_dir=run_dir, reporter=reporter, on_accepted=on_accepted)
    trainer = Trainer.from_config(config, run_dir=run_dir, reporter=reporter)
    return trainer.fit(on_accepted=on_accepted)


def fit_ensemble(
    config: TrainApp,
    *,
    run_dir: Path,
    reporter: Reporter | None = None,
    on_accepted: Callback | None = None,
) -> FitResult:
    """Train ``train.ensemble`` members one after another, then write ``best`` as an
    ensemble bundle of their ``best`` bundles and record its validation BLEU.

    Why sequential members with split time: ``max_time`` keeps meaning the whole
    run's budget (each member gets an even share of what is left, so a member that
    stops early leaves its time to the next), and a crash loses at most the member
    in progress: finished members leave ``fit.json`` and are skipped when the run
    is started again (the member in progress resumes from its checkpoint like any
    run).
    """
    t = config.train
    if t.ensemble < 2:
        raise ValueError(f"train.ensemble={t.ensemble}; an ensemble needs at least 2 members")
    rundir.check_kind(Path(run_dir), ensemble=True)
    accepted = _once(on_accepted)
    at_once = t.ensemble_parallel > 1
    if at_once and distributed.current().size > 1:
        logger.warning(
            "under torchrun the members train one after another, each on every process "
            "(train.ensemble_parallel=%d is not used)",
            t.ensemble_parallel,
        )
        at_once = False
    if at_once:
        results = _fit_side_by_side(config, Path(run_dir))
    else:
        results = _fit_one_after_another(config, Path(run_dir), reporter, accepted)
    if not distributed.current().is_main:  # the ensemble bundle is rank 0's to write
        return replace(results[-1], best=Path(run_dir) / "best")
    accepted()
    return _ensemble_result(config, Path(run_dir), results, reporter)


def _fit_one_after_another(
    config: TrainApp, run_dir: Path, reporter: Reporter | None, accepted: Callback
) -> list[FitResult]:
    t = config.train
    results: list[FitResult] = []
    for k in range(1, t.ensemble + 1):
        member = _member(config, run_dir, k, max_time=_member_time(t, results))
        done = member.run_dir / FIT_RESULT
        if t.resume and done.is_file():
            logger.info("ensemble member %d already trained (%s)", k, done)
            results.append(_read_fit_result(done))
            continue
        trainer = Trainer.from_config(member.config, run_dir=member.run_dir, reporter=reporter)
        results.append(trainer.fit(on_accepted=accepted))
        if distributed.current().is_main:
            _write_member_result(member, results[-1])
    return results


def _fit_side_by_side(config: TrainApp, run_dir: Path) -> list[FitResult]:
    """Members ``train.ensemble_parallel`` at a time, each in a process of its own."""
    t = config.train
    members = [_member(config, run_dir, k, max_time=t.max_time) for k in range(1, t.ensemble + 1)]
    todo = [m for m in members if not (t.resume and (m.run_dir / FIT_RESULT).is_file())]
    for m in members:
        if m not in todo:
            logger.info("ensemble member %d already trained", m.number)
    side_by_side.train(config, todo, write_result=_write_member_result)
    return [_read_fit_result(m.run_dir / FIT_RESULT) for m in members]


def _member(config: TrainApp, run_dir: Path, k: int, *, max_time: float) -> Member:
    """Member ``k`` (from 1): seed ``seed + k - 1`` in ``run_dir/memberK``."""
    t = config.train
    train = replace(t, seed=t.seed + k - 1, max_time=max_time, ensemble=1, ensemble_parallel=1)
    member_dir = run_dir / f"member{k}"
    return Member(k, replace(config, train=train, run_dir=str(member_dir)), member_dir)


def _write_member_result(member: Member, result: FitResult) -> None:
    """The record that member ``member`` finished (what a restarted run skips)."""
    fs.write_bytes(member.run_dir / FIT_RESULT, _fit_result_json(result))


def _ensemble_result(
    config: TrainApp, run_dir: Path, results: list[FitResult], reporter: Reporter | None
) -> FitResult:
    """Write the ensemble bundle of the members' ``best``, validate and record it."""
    best = bundle_io.save_ensemble(run_dir / "best", [r.best for r in results])
    device = pick_device(config.train.device)
    loaded = bundle_io.load(best, device=device)
    valid = load_split(config.data, "valid")
    translator = Translator(loaded.model, loaded.tokenizer, config.decode, device=device)
    limit = config.train.valid_max_sentences
    score = greedy_bleu(translator, list(valid["src"]), list(valid["tgt"]), limit=limit)
    elapsed = sum(r.elapsed for r in results)
    record = EnsembleRecord(members=len(results), bleu=score, elapsed=round(elapsed, 2))
    records.append(run_dir, record)
    if reporter:
        reporter.on_record(record)
    return FitResult(
        best=best,
        last=results[-1].last,
        best_bleu=score,
        steps=sum(r.steps for r in results),
        elapsed=elapsed,
        stop_reason="; ".join(f"member {k}: {r.stop_reason}" for k, r in enumerate(results, 1)),
    )


def _once(callback: Callback | None) -> Callback:
    """``callback`` on the first call only (none at all when it is None)."""
    called = [callback is None]

    def call() -> None:
        if not called[0] and callback is not None:
            called[0] = True
            callback()

    return call


def _member_time(t: TrainingConfig, done: list[FitResult]) -> float:
    """The next member's share of what is left of ``max_time`` (0: no time limit), so
    time a member saves by stopping early goes to the members after it."""
    if not t.max_time:
        return 0.0
    left = t.max_time - sum(r.elapsed for r in done)
    return max(1.0, left / (t.ensemble - len(done)))


def _fit_result_json(result: FitResult) -> bytes:
    fields = asdict(result) | {"best": str(result.best), "last": str(result.last)}
    return json.dumps(fields).encode()


def _read_fit_result(path: Path) -> FitResult:
    fields = json.loads(path.read_text())
    return FitResult(**(fields | {"best": Path(fields["best"]), "last": Path(fields["last"])}))
