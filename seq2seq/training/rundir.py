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
  (`bundle.atomic_directory`); a kill can leave the newest complete copy as
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
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from safetensors import safe_open

from seq2seq.config import OptimConfig, TrainApp
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.model import bundle as bundle_io
from seq2seq.training.snapshots import SNAPSHOT_DIR

logger = logging.getLogger(__name__)

LOCK = ".lock"
MANIFEST = "run.json"
PREVIOUS_METRICS = "metrics.previous.jsonl"
BUNDLES = ("last", "best", "average")
# Settings a checkpoint cannot survive: they change the corpus, the pieces or the
# parameters. Everything else (optimiser, budgets, decoding) may change on resume.
PROTECTED = ("data", "tokenizer", "model")
UNPROTECTED_KEYS = ("tokenizer.cache_dir",)
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


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest, or None when the directory has none (or it is unreadable)."""
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
    bundle_io.atomic_write_bytes(run_dir / MANIFEST, text.encode())


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
        state = bundle_io.load_trainer_state(path)
    except Exception as e:  # any unreadable copy is simply not a candidate
        logger.debug("checkpoint candidate %s is incomplete: %s", path, e)
        return None
    return int(state["step"]) if state and "step" in state else None


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
            bundle_io.remove_entry(last)
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
    for name in (bundle_io.METRICS, MANIFEST, "fit.json"):
        stale += run_dir.glob(f".{name}.*")
    snapshot_dir = run_dir / SNAPSHOT_DIR
    if snapshot_dir.is_dir():
        stale += snapshot_dir.glob(".*")
    for path in (p for p in stale if os.path.lexists(p)):
        logger.info("removing stale temporary %s", path)
        bundle_io.remove_entry(path)


def lost_checkpoint(run_dir: Path) -> bool:
    """Whether the run got past its first checkpoint, though none is left now.

    Every regular validation appends its record and then writes ``last/``; a
    second validation step on record therefore means the first checkpoint was
    complete, and a restart from step 0 would silently discard that work.
    """
    steps = {r.get("step") for r in bundle_io.load_metrics(run_dir) if r.get("kind") == "valid"}
    return len(steps) >= 2


def _clear_unfinished_start(run_dir: Path) -> None:
    """Records of an attempt killed before its first checkpoint: a restart from step 0
    writes them again, so they go (``best/`` stays, guarded by its recorded BLEU)."""
    metrics = run_dir / bundle_io.METRICS
    if metrics.is_file() and metrics.stat().st_size:
        logger.warning("no checkpoint in %s yet: starting from step 0", run_dir)
        metrics.unlink()


def recorded_best_bleu(run_dir: Path) -> float:
    """The validation BLEU of the model in ``best/`` (-1 when there is none)."""
    path = run_dir / "best"
    if not path.is_dir():
        return -1.0
    scores = [float(r["best_bleu"]) for r in bundle_io.load_metrics(path) if "best_bleu" in r]
    return max(scores, default=-1.0)


def records_until(run_dir: Path, checkpoint: Path, step: int) -> list[dict[str, Any]]:
    """The metrics records of a run resumed at ``step``: the run's own up to that step,
    or, when they fall short of what the checkpoint saw (it was recovered from a
    temporary copy whose records never reached the run's file), the checkpoint's."""
    kept = [r for r in bundle_io.load_metrics(run_dir) if r["step"] <= step]
    saved = bundle_io.load_metrics(checkpoint)
    if kept[: len(saved)] == saved:
        return kept
    return saved + [r for r in kept if r["step"] == step and r not in saved]


# ---------------------------------------------------------------------------- run


@dataclass
class Run:
    """An open run directory: held lock, checkpoint to resume (if any), manifest."""

    run_dir: Path
    config: TrainApp
    lock: RunLock | None  # None: a follower (torchrun rank > 0), which never writes
    checkpoint: Path | None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Whether the run ended before (it may still go on under a larger budget)."""
        return self.checkpoint is not None and self.manifest.get("state") == "finished"

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
        recorded = old.get("data_digest") if data_digest else None
        changed = recorded != data_digest if recorded else old.get("data_key", data_key) != data_key
        if self.checkpoint is not None and changed:
            raise RunDirError(
                f"the training data of {self.run_dir} changed since the run started "
                f"(same settings, different lines); resuming would train on other data: "
                f"{FRESH_HINT}"
            )
        if self.checkpoint is not None and old.get("tokenizer_sha256", tok) != tok:
            raise RunDirError(
                f"{self.checkpoint} holds another tokenizer than the one {self.run_dir} "
                f"started with: {FRESH_HINT}"
            )
        fixed = protected(settings(self.config))
        self.manifest = {
            "state": old.get("state", "running") if self.checkpoint else "running",
            "stop_reason": old.get("stop_reason", "") if self.checkpoint else "",
            "settings": fixed,
            "config_hash": digest(fixed),
            "data_key": data_key,
            "data_digest": data_digest,
            "tokenizer_sha256": tok,
        }
        if self.lock is not None:
            write_manifest(self.run_dir, self.manifest)

    def mark(self, state: str, reason: str = "") -> None:
        """Record ``running`` or ``finished`` (with the stop reason) in the manifest."""
        self.manifest.update(state=state, stop_reason=reason)
        if self.lock is not None:
            write_manifest(self.run_dir, self.manifest)

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
        RunDirError: resuming would change the run's data, tokenizer or model, or
            the directory holds earlier work but no checkpoint to resume from.
    """
    run_dir = Path(run_dir)
    if follower:
        last = run_dir / "last"
        resumable = config.train.resume and _checkpoint_step(last) is not None
        return Run(run_dir, config, None, last if resumable else None, read_manifest(run_dir) or {})
    lock = RunLock(run_dir)
    try:
        checkpoint = recover(run_dir)
        manifest = read_manifest(run_dir) or {}
        if not config.train.resume:
            _start_afresh(run_dir, checkpoint)
            return Run(run_dir, config, lock, None, {})
        if checkpoint is None and lost_checkpoint(run_dir):
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


def _check_settings(
    run_dir: Path, config: TrainApp, manifest: dict[str, Any], checkpoint: Path
) -> None:
    """Refuse changed data/tokenizer/model settings; log the changes that apply."""
    before = settings(bundle_io.load_config(checkpoint))
    now = settings(config)
    fixed_before = manifest.get("settings") or protected(before)
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
        bundle_io.remove_entry(path)
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


# ---------------------------------------------------------------- optimiser changes


def apply_optim_changes(
    param_groups: Iterable[dict[str, Any]], scheduler: Any, old: OptimConfig, new: OptimConfig
) -> None:
    """Make changed optimiser settings take effect after the optimiser and scheduler
    states (which carry the old values) were loaded.

    The rate is scaled by ``new.lr / old.lr`` so a schedule's progress (warm-up,
    plateau halvings) carries over to the new base rate.
    """
    scale = new.lr / old.lr if old.lr else 1.0
    groups = list(param_groups)
    for group in groups:
        if scale != 1.0:
            group["lr"] *= scale
            if "initial_lr" in group:
                group["initial_lr"] = new.lr
        group["betas"] = (new.beta1, new.beta2)
        group["weight_decay"] = new.weight_decay
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [new.lr] * len(groups)
    if hasattr(scheduler, "min_lrs"):  # ReduceLROnPlateau
        scheduler.factor = new.plateau_factor
        scheduler.patience = new.plateau_patience
        scheduler.min_lrs = [new.min_lr] * len(groups)
