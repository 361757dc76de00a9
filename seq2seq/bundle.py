"""Model bundles: a directory holding everything needed to translate.

Layout::

    model.safetensors   weights (no pickle)
    config.yaml         the resolved training configuration
    src.spm, tgt.spm    SentencePiece models
    metrics.jsonl       training and validation metrics so far
    trainer_state.pt    optimiser/scheduler/RNG/position, checkpoints only

An ensemble bundle instead holds ``ensemble.json`` (the member names) and one
complete bundle per member in subdirectories, so it is self-contained: it can be
moved or copied like any bundle, and ``load`` returns an `Ensemble` model.

Why directories are swapped whole: a bundle is written into a fresh sibling
directory, then renamed into place (the previous one is renamed aside first
and deleted last). A kill at any moment leaves either the old or the new
bundle complete; ``resolve`` falls back to the set-aside copy if the kill hit
between the two renames. Loading never unpickles arbitrary objects: weights
come from safetensors and trainer state through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model

from seq2seq.config import TrainApp
from seq2seq.ensemble import Ensemble
from seq2seq.model import Seq2Seq
from seq2seq.tokenizer import PAD_ID, Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TRAINER_STATE = "trainer_state.pt"
ENSEMBLE = "ensemble.json"


class BundleError(ValueError):
    """A path is not a readable model bundle."""


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: configuration, tokenizer and model (in eval mode).

    For an ensemble bundle, ``config`` is its first member's.
    """

    config: TrainApp
    tokenizer: Tokenizer
    model: Seq2Seq | Ensemble
    path: Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temporary sibling and ``os.replace`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """The bundle directory, or its set-aside copy if a swap was interrupted."""
    path = Path(path).expanduser()
    old = path.with_name(path.name + ".old")
    for candidate in (path, old):
        if (candidate / WEIGHTS).is_file() or (candidate / ENSEMBLE).is_file():
            return candidate
    raise BundleError(
        f"{path} is not a model bundle (no {WEIGHTS} or {ENSEMBLE}); pass a bundle directory"
    )


def save(
    path: str | Path,
    *,
    model: Seq2Seq,
    config: TrainApp,
    tokenizer: Tokenizer,
    metrics: list[dict[str, Any]] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete bundle atomically and return its path."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
        for name, data in tokenizer.serialize().items():
            (tmp / name).write_bytes(data)
        lines = "".join(json.dumps(m) + "\n" for m in metrics or [])
        (tmp / METRICS).write_text(lines)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    return path


def save_ensemble(path: str | Path, members: Sequence[str | Path]) -> Path:
    """Write an ensemble bundle atomically: a copy of every member bundle and the
    manifest naming them. Members must share their tokenizer (same vocabularies)."""
    roots = [resolve(m) for m in members]
    nested = [str(r) for r in roots if (r / ENSEMBLE).is_file()]
    if nested:
        raise BundleError(f"ensemble members must be single models; {nested} are ensembles")
    if len(roots) < 2:
        raise BundleError(f"an ensemble needs at least 2 member bundles, got {len(roots)}")
    first = _spm_files(roots[0])
    for root in roots[1:]:
        if _spm_files(root) != first:
            raise BundleError(
                f"{root} and {roots[0]} have different SentencePiece models; "
                "ensemble members must share one tokenizer"
            )
    names = [f"member{k}" for k in range(1, len(roots) + 1)]
    with atomic_directory(Path(path)) as tmp:
        for name, root in zip(names, roots, strict=True):
            shutil.copytree(root, tmp / name, ignore=shutil.ignore_patterns(TRAINER_STATE))
        (tmp / ENSEMBLE).write_text(json.dumps({"members": names}, indent=2) + "\n")
    return Path(path)


def ensemble_members(path: str | Path) -> list[Path] | None:
    """The member bundle directories of an ensemble bundle, or None for a single model."""
    root = resolve(path)
    manifest = root / ENSEMBLE
    if not manifest.is_file():
        return None
    names = json.loads(manifest.read_text())["members"]
    return [root / name for name in names]


def load_config(path: str | Path) -> TrainApp:
    """The bundle's configuration (an ensemble's first member's), checked against
    the current schema."""
    members = ensemble_members(path)
    if members:
        return load_config(members[0])
    raw = OmegaConf.load(resolve(path) / CONFIG)
    merged = OmegaConf.merge(OmegaConf.structured(TrainApp), raw)
    config = OmegaConf.to_object(merged)
    assert isinstance(config, TrainApp)
    return config


def load(path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    """Load configuration, tokenizer and weights; the model is in eval mode."""
    members = ensemble_members(path)
    if members:
        loaded = [load(m, device=device) for m in members]
        models = [b.model for b in loaded]
        if not all(isinstance(m, Seq2Seq) for m in models):
            raise BundleError(f"{path}: an ensemble's members must be single models")
        first = loaded[0]
        return Bundle(first.config, first.tokenizer, Ensemble(models).eval(), resolve(path))
    root = resolve(path)
    config = load_config(root)
    files = _spm_files(root)
    if not files:
        raise BundleError(f"{root} has no SentencePiece models (*.spm)")
    tokenizer = Tokenizer.from_serialized(files)
    model = Seq2Seq.from_config(
        config.model,
        src_vocab=tokenizer.src_vocab_size,
        tgt_vocab=tokenizer.tgt_vocab_size,
        pad_id=PAD_ID,
    )
    load_model(model, str(root / WEIGHTS), device=str(device))
    model.to(device).eval()
    return Bundle(config=config, tokenizer=tokenizer, model=model, path=root)


def _spm_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.spm"))}


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Metrics records; a torn last line (from a crash mid-append) is skipped."""
    records = []
    file = Path(path) / METRICS if Path(path).is_dir() else Path(path)
    if not file.is_file():
        return records
    for line in file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    """Trainer state for resuming, loaded without unpickling arbitrary code."""
    file = resolve(path) / TRAINER_STATE
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)
