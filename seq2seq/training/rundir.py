"""A training run directory: one writer, an honest resume, nothing lost by accident.

Why each piece:

* **Lock.** Two trainings on one directory interleave checkpoints and metrics.
  An OS lock (``fcntl.flock`` on ``.lock``) is held for the whole run; the
  kernel drops it when the process dies, so a kill never leaves a stale lock.
  The holder writes its PID into the file so a second process can name it.
* **Manifest** (``run.json``). What the run was started with: the settings that
  must not change while it lives (data, tokenizer, model), a key of the
  training data, the tokenizer's SHA-256, and whether it finished and why. A
  resume compares against it and refuses a run that would change underneath its
  checkpoint, instead of continuing with a different tokenizer or corpus.
* **Recovery.** A checkpoint is a directory swapped in by two renames
  (`fs.atomic_directory`); a kill can leave the newest complete copy as
  ``last/``, as the set-aside ``last.old`` or as a finished ``.last.tmp-*``.
  The newest complete one becomes ``last/``, and every other temporary is
  removed, before training starts.
* **No silent restart.** A directory whose run got past its first checkpoint
  but has none left is refused unless ``train.resume=false`` asks for a fresh
  run; a run killed before its first checkpoint starts again from step 0. A
  fresh start replaces ``best/`` only with a model that validates better.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import weakref
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from safetensors import safe_open

from seq2seq.config import TrainApp
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.model import bundle as bundle_io
from seq2seq.runtime import fs
from seq2seq.training import records, state
from seq2seq.training.snapshots import SNAPSHOT_DIR

logger = logging.getLogger(__name__)

LOCK = ".lock"
MANIFEST = "run.json"
FIT_RESULT = "fit.json"  # a finished ensemble member's result (`seq2seq.training.fit`)
PREVIOUS_METRICS = "metrics.previous.jsonl"
BUNDLES = ("last", "best", "average")
# Settings a checkpoint cannot survive: they change the corpus, the pieces or the
# parameters. Everything else (optimiser, budgets, decoding) may change on resume.
PROTECTED = ("data", "tokenizer", "model")
UNPROTECTED_KEYS = ("tokenizer.cache_dir", "model.rnn_impl")
FRESH_HINT = (
    "pass train.resume=false to start a fresh run in this directory (best/ is kept "
    "until a better model replaces it), or choose another run_dir"
)


class RunDirError(ValueError):
    """The run directory cannot be used as asked."""


class RunLockedError(RunDirError):
    """Another process is training in the run directory."""


# --------------------------------------------------------------------------- lock


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock``, released by `release` or at exit."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{run_dir} is in use by another training (PID {holder}); wait for it to "
                "finish, stop it, or choose another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        self._finalizer()


# ----------------------------------------------------------------------- settings


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, list | tuple):
        value = [str(v) for v in value]
    return {prefix.rstrip("."): value}


def settings(config: TrainApp) -> dict[str, Any]:
    """Every setting as ``dotted.key -> plain value`` (enums as their names)."""
    flat = _flatten(config)
    flat.pop("run_dir", None)
    return flat


def protected(flat: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must keep (see ``PROTECTED``)."""
    return {
        k: v for k, v in flat.items() if k.split(".")[0] in PROTECTED and k not in UNPROTECTED_KEYS
    }


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    files = tokenizer.serialize()
    return digest({name: hashlib.sha256(data).hexdigest() for name, data in files.items()})


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)]


# ---------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """What ``run.json`` records: the protected settings (dotted keys), a key of
    the training data, the tokenizer's SHA-256, and whether the run finished.

    ``data_key`` and ``tokenizer_sha256`` are None in a manifest written before
    they were recorded: such a run is not checked against them.
    """

    settings: dict[str, Any]
    data_key: str | None = None
    data_digest: str | None = None
    tokenizer_sha256: str | None = None
    state: Literal["running", "finished"] = "running"
    stop_reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "stop_reason": self.stop_reason,
            "settings": self.settings,
            "config_hash": digest(self.settings),
            "data_key": self.data_key,
            "data_digest": self.data_digest,
            "tokenizer_sha256": self.tokenizer_sha256,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Manifest:
        settings = raw.get("settings")
        return cls(
            settings=settings if isinstance(settings, dict) else {},
            data_key=_text(raw.get("data_key")),
            data_digest=_text(raw.get("data_digest")),
            tokenizer_sha256=_text(raw.get("tokenizer_sha256")),
            state="finished" if raw.get("state") == "finished" else "running",
            stop_reason=_text(raw.get("stop_reason")) or "",
        )

    @classmethod
    def read(cls, run_dir: Path) -> Manifest | None:
        raw = read_manifest(run_dir)
        return cls.from_json(raw) if raw is not None else None

    def write(self, run_dir: Path) -> None:
        write_manifest(run_dir, self.to_json())


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest as its JSON object, or None when the directory has none
    (or it is unreadable)."""
    path = run_dir / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s: %s", path, e)
        return None
    return data if isinstance(data, dict) else None


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"
    fs.write_text(run_dir / MANIFEST, text)


# ---------------------------------------------------------------------- recovery


def _checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint directory, or None if it is incomplete.

    Files are written in a fixed order with the trainer state last, so a
    loadable state and a whole weights file mean the rest is whole too.
    """
    try:
        if path.is_symlink() or not path.is_dir():
            return None
        if not all((path / n).is_file() for n in (bundle_io.CONFIG, bundle_io.WEIGHTS)):
            return None
        with safe_open(str(path / bundle_io.WEIGHTS), framework="pt"):
            pass
        checkpoint = state.load(path)
    except state.CheckpointError:
        raise  # complete, but not readable by this version: say so, do not drop it
    except Exception as e:  # any unreadable copy is simply not a candidate
        logger.debug("checkpoint candidate %s is incomplete: %s", path, e)
        return None
    return checkpoint.state.step if checkpoint else None


def _candidates(run_dir: Path, name: str) -> list[Path]:
    return [run_dir / name, run_dir / f"{name}.old", *sorted(run_dir.glob(f".{name}.tmp-*"))]


def recover(run_dir: Path) -> Path | None:
    """Put the newest complete checkpoint in place as ``last/``, bring back a set-aside
    ``best``/``average``, and remove stale temporaries; returns ``last`` or None."""
    steps = [(_checkpoint_step(path), path) for path in _candidates(run_dir, "last")]
    complete = [(step, path) for step, path in steps if step is not None]
    last = run_dir / "last"
    if complete:
        step, newest = max(complete, key=lambda c: (c[0], c[1] == last))
        if newest != last:
            logger.warning("recovering checkpoint of step %d from %s", step, newest)
            fs.remove_entry(last)
            os.replace(newest, last)
    for name in BUNDLES[1:]:
        path, old = run_dir / name, run_dir / f"{name}.old"
        if not os.path.lexists(path) and os.path.isdir(old):
            logger.warning("restoring %s from %s", path, old)
            os.replace(old, path)
    _remove_temporaries(run_dir)
    return last if complete else None


def _remove_temporaries(run_dir: Path) -> None:
    """Leftovers of interrupted writes; safe to delete once ``recover`` chose."""
    stale: list[Path] = []
    for name in BUNDLES:
        stale += [run_dir / f"{name}.old", *run_dir.glob(f".{name}.tmp-*")]
    for name in (bundle_io.METRICS, MANIFEST, FIT_RESULT):
        stale += run_dir.glob(f".{name}.*")
    snapshot_dir = run_dir / SNAPSHOT_DIR
    if snapshot_dir.is_dir():
        stale += snapshot_dir.glob(".*")
    for path in (p for p in stale if os.path.lexists(p)):
        logger.info("removing stale temporary %s", path)
        fs.remove_entry(path)


def _clear_unfinished_start(run_dir: Path) -> None:
    """Records of an attempt killed before its first checkpoint: a restart from step 0
    writes them again, so they go (``best/`` stays, guarded by its recorded BLEU)."""
    metrics = run_dir / bundle_io.METRICS
    if metrics.is_file() and metrics.stat().st_size:
        logger.warning("no checkpoint in %s yet: starting from step 0", run_dir)
        metrics.unlink()


# ---------------------------------------------------------------------------- run


@dataclass
class Run:
    """An open run directory: held lock, checkpoint to resume (if any), manifest."""

    run_dir: Path
    config: TrainApp
    lock: RunLock | None  # None: a follower (torchrun rank > 0), which never writes
    checkpoint: Path | None
    manifest: Manifest | None = None

    @property
    def finished(self) -> bool:
        """Whether the run ended before (it may still go on under a larger budget)."""
        done = self.manifest is not None and self.manifest.state == "finished"
        return self.checkpoint is not None and done

    def checkpoint_tokenizer(self) -> Tokenizer | None:
        """The tokenizer the checkpoint was trained with; None when starting afresh."""
        if self.checkpoint is None:
            return None
        logger.info("tokenizer from the checkpoint %s", self.checkpoint)
        return bundle_io.load_tokenizer(self.checkpoint)

    def begin(self, *, data_key: str, tokenizer: Tokenizer, data_digest: str = "") -> None:
        """Check that the data and tokenizer are the run's, then record them. Where
        both runs recorded the content's digest, it decides: files copied or touched
        are the same data, files edited under their old times are not."""
        old, tok = self.manifest, tokenizer_digest(tokenizer)
        if self.checkpoint is not None and old is not None:
            # Where both runs recorded the content's digest it decides; otherwise the key.
            if old.data_digest and data_digest:
                changed = old.data_digest != data_digest
            else:
                changed = old.data_key not in (None, data_key)
            if changed:
                raise RunDirError(
                    f"the training data of {self.run_dir} changed since the run started "
                    f"(same settings, different lines); resuming would train on other data: "
                    f"{FRESH_HINT}"
                )
            if old.tokenizer_sha256 not in (None, tok):
                raise RunDirError(
                    f"{self.checkpoint} holds another tokenizer than the one {self.run_dir} "
                    f"started with: {FRESH_HINT}"
                )
        kept = old if self.checkpoint is not None and old is not None else None
        self._record(
            Manifest(
                settings=protected(settings(self.config)),
                data_key=data_key,
                data_digest=data_digest or None,
                tokenizer_sha256=tok,
                state=kept.state if kept else "running",
                stop_reason=kept.stop_reason if kept else "",
            )
        )

    def mark(self, progress: Literal["running", "finished"], reason: str = "") -> None:
        """Record ``running`` or ``finished`` (with the stop reason) in the manifest."""
        if self.manifest is not None:
            self._record(dataclasses.replace(self.manifest, state=progress, stop_reason=reason))

    def _record(self, manifest: Manifest) -> None:
        self.manifest = manifest
        if self.lock is not None:
            manifest.write(self.run_dir)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def open_run(config: TrainApp, run_dir: Path, *, follower: bool = False) -> Run:
    """Lock ``run_dir``, recover its newest checkpoint and decide resume or fresh start.

    A ``follower`` (a torchrun process other than rank 0, which opened the run
    first) takes no lock and changes nothing: it resumes from the ``last/`` that
    rank 0 recovered, or starts afresh with it.

    Raises:
        RunLockedError: another process trains here.
        RunDirError: resuming would change the run's data, tokenizer or model, the
            directory holds an ensemble's run, or it holds earlier work but no
            checkpoint to resume from.
    """
    run_dir = Path(run_dir)
    if follower:
        last = run_dir / "last"
        resumable = config.train.resume and _checkpoint_step(last) is not None
        return Run(run_dir, config, None, last if resumable else None, Manifest.read(run_dir))
    check_kind(run_dir, ensemble=False)
    lock = RunLock(run_dir)
    try:
        checkpoint = recover(run_dir)
        manifest = Manifest.read(run_dir)
        if not config.train.resume:
            _start_afresh(run_dir, checkpoint)
            return Run(run_dir, config, lock, None)
        if checkpoint is None and records.lost_checkpoint(run_dir):
            raise RunDirError(
                f"{run_dir} holds earlier work (validation records of several steps) but "
                f"no complete checkpoint to resume from (last/ is missing or incomplete): "
                f"{FRESH_HINT}"
            )
        if checkpoint is None:
            _clear_unfinished_start(run_dir)
        else:
            _check_settings(run_dir, config, manifest, checkpoint)
        return Run(run_dir, config, lock, checkpoint, manifest)
    except BaseException:
        lock.release()
        raise


def check_kind(run_dir: Path, *, ensemble: bool) -> None:
    """A run directory holds one model or one ensemble for its whole life.

    Why: an ensemble trains its members in ``memberK/`` and writes ``best/`` as an
    ensemble bundle, so started on a single model's directory it would orphan
    ``last/`` and replace ``best/``; a single model started on an ensemble's
    directory would replace the ensemble's ``best/``. Either changes the model,
    which a resumed run refuses, and ``train.resume=false`` would not undo it.
    """
    single = [n for n in (MANIFEST, "last", "last.old") if os.path.lexists(run_dir / n)]
    members = [n for n in ("member1", f"best/{bundle_io.ENSEMBLE}") if (run_dir / n).exists()]
    if ensemble and single:
        raise RunDirError(
            f"{run_dir} holds a single model's run ({single[0]}); train.ensemble > 1 would "
            "replace it with an ensemble: keep train.ensemble=1, or choose another run_dir"
        )
    if not ensemble and members:
        raise RunDirError(
            f"{run_dir} holds an ensemble's run ({members[0]}); train.ensemble=1 would "
            "replace it with a single model: set train.ensemble as the run was started, "
            "or choose another run_dir"
        )


def _check_settings(
    run_dir: Path, config: TrainApp, manifest: Manifest | None, checkpoint: Path
) -> None:
    """Refuse changed data/tokenizer/model settings; log the changes that apply."""
    before = settings(bundle_io.load_config(checkpoint))
    now = settings(config)
    fixed_before = (manifest.settings if manifest else None) or protected(before)
    # Keys the run's record lacks came with a newer schema: their defaults apply.
    refused = changes(fixed_before, {k: v for k, v in protected(now).items() if k in fixed_before})
    if refused:
        raise RunDirError(
            f"{run_dir} was started with other data, tokenizer or model settings "
            f"({'; '.join(refused[:5])}); a resumed run must keep them: {FRESH_HINT}"
        )
    applied = [c for c in changes(before, now) if c.split(":")[0].split(".")[0] not in PROTECTED]
    if applied:
        logger.info("resuming with changed settings: %s", "; ".join(applied))


def _start_afresh(run_dir: Path, checkpoint: Path | None) -> None:
    """``train.resume=false``: drop the checkpoint and snapshots, keep best/ and the
    old metrics (moved to ``metrics.previous.jsonl``)."""
    dropped = [p for p in (checkpoint, run_dir / SNAPSHOT_DIR, run_dir / MANIFEST) if p]
    dropped = [p for p in dropped if os.path.lexists(p)]
    for path in dropped:
        fs.remove_entry(path)
    metrics = run_dir / bundle_io.METRICS
    if metrics.is_file():
        os.replace(metrics, run_dir / PREVIOUS_METRICS)
        dropped.append(metrics)
    if dropped:
        logger.warning(
            "train.resume=false: starting a fresh run in %s (removed %s; best/ is kept "
            "until a better model replaces it)",
            run_dir,
            ", ".join(p.name for p in dropped),
        )
