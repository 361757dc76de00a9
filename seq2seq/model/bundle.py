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

Why loading is bounded: a bundle may come from someone else. Every file read
must be a regular file inside the bundle directory (no symlink out of it, no
device or FIFO) and within a size limit; ensemble members are plain
sub-directory names; the configuration is read without YAML aliases (a few
hundred bytes of them expand to gigabytes) or interpolations (``oc.env`` would
read this machine's environment) and checked against the schema and its
ranges, and the weights file's header against the model that configuration
and the tokenizer describe (names, shapes, element types, byte ranges), before
any tensor is allocated. A bundle also records the SHA-256 of its tokenizer
files, so swapped or replaced SentencePiece models are refused instead of
translating garbage, as are NaN weights and ensemble members with different
tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from seq2seq.config import ModelConfig, TrainApp, validate
from seq2seq.data.tokenizer import PAD_ID, SRC_FILE, TGT_FILE, Tokenizer
from seq2seq.model.ensemble import Ensemble
from seq2seq.model.model import Seq2Seq
from seq2seq.runtime.fs import atomic_directory, new_file_mode, read_bounded, regular_file

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TRAINER_STATE = "trainer_state.pt"
ENSEMBLE = "ensemble.json"
TOKENIZER_SUMS = "tokenizer.json"

# Size limits of the small files; the weights are bounded by their own header.
MAX_CONFIG_BYTES = 1 << 20
MAX_SPM_BYTES = 64 << 20
MAX_JSON_BYTES = 64 << 10
MAX_MODEL_SLACK = 1 << 28  # bytes a config may describe beyond 64x its weights
MAX_HEADER_BYTES = 16 << 20
MEMBER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
MAX_YAML_DEPTH = 32  # the schema nests three levels; deeper YAML is not a config
# safetensors' element types and their sizes in bytes
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
_DTYPE_BYTES |= {"U8": 1, "BOOL": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class BundleError(ValueError):
    """A path is not a readable model bundle."""


class _PlainYAML(yaml.SafeLoader):
    """Safe YAML without aliases and with bounded nesting.

    Why: an alias (``*a``) lets a few hundred bytes expand to gigabytes once the
    tree is copied, or to a cycle (``a: &a [*a]``), and nothing this project
    writes uses one; deep nesting would exhaust the stack.
    """

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"an alias (*name) at line {mark.line + 1}; aliases are refused")
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"nesting deeper than {MAX_YAML_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


# Every file of a bundle is read through these: confined to the bundle directory.
_regular_file = partial(regular_file, error=BundleError, within="the bundle")
_read_bounded = partial(read_bounded, error=BundleError, within="the bundle")


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: configuration, tokenizer and model (in eval mode).

    For an ensemble bundle, ``config`` is its first member's.
    """

    config: TrainApp
    tokenizer: Tokenizer
    model: Seq2Seq | Ensemble
    path: Path


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
        try:
            save_model(model, str(tmp / WEIGHTS))
        except SafetensorError as e:  # e.g. a full disk; an OSError like any other write
            raise OSError(f"cannot write {path / WEIGHTS}: {e}") from e
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
        spm_files = tokenizer.serialize()
        for name, data in spm_files.items():
            (tmp / name).write_bytes(data)
        sums = {name: hashlib.sha256(data).hexdigest() for name, data in spm_files.items()}
        (tmp / TOKENIZER_SUMS).write_text(json.dumps(sums, indent=2) + "\n")
        lines = "".join(json.dumps(m) + "\n" for m in metrics or [])
        (tmp / METRICS).write_text(lines)
        if trainer_state is not None:
            try:
                torch.save(trainer_state, tmp / TRAINER_STATE)
            except RuntimeError as e:  # a full disk, in torch's words
                raise OSError(f"cannot write {path / TRAINER_STATE}: {e}") from e
        for file in tmp.iterdir():  # safetensors creates its file 0600: a service reads it
            os.chmod(file, new_file_mode())
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
    _check_shared_tokenizer(roots)
    names = [f"member{k}" for k in range(1, len(roots) + 1)]
    with atomic_directory(Path(path)) as tmp:
        for name, root in zip(names, roots, strict=True):
            shutil.copytree(root, tmp / name, ignore=shutil.ignore_patterns(TRAINER_STATE))
        (tmp / ENSEMBLE).write_text(json.dumps({"members": names}, indent=2) + "\n")
    return Path(path)


def _check_shared_tokenizer(roots: Sequence[Path]) -> None:
    """Members decode with the first member's tokenizer: with another one their
    averaged scores mean nothing (empty or garbage translations)."""
    first = _spm_files(roots[0])
    for root in roots[1:]:
        if _spm_files(root) != first:
            raise BundleError(
                f"{root} and {roots[0]} have different SentencePiece models; "
                "ensemble members must share one tokenizer"
            )


def ensemble_members(path: str | Path) -> list[Path] | None:
    """The member bundle directories of an ensemble bundle, or None for a single model.

    Members must be listed as plain names of real sub-directories, each a single
    model: no paths, no ``.`` or ``..``, no symlinks, no nested ensembles.
    """
    root = resolve(path)
    if not os.path.lexists(root / ENSEMBLE):
        return None
    try:
        names = json.loads(_read_bounded(root, ENSEMBLE, MAX_JSON_BYTES))["members"]
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{root / ENSEMBLE} is not valid: {e}") from e
    valid = isinstance(names, list) and all(
        isinstance(n, str) and MEMBER_NAME.fullmatch(n) for n in names
    )
    if not valid or len(names) < 2:
        raise BundleError(
            f"{root / ENSEMBLE}: 'members' must list at least 2 sub-directory names "
            f"(plain names such as member1, no paths), got {str(names)[:200]}"
        )
    members = [root / name for name in names]
    for member in members:
        if member.is_symlink() or not member.is_dir():
            raise BundleError(f"ensemble member {member} is not a directory inside {root}")
        if os.path.lexists(member / ENSEMBLE):
            raise BundleError(f"ensemble member {member} is an ensemble; members are single models")
    return members


def load_config(path: str | Path) -> TrainApp:
    """The bundle's configuration (an ensemble's first member's), checked against
    the current schema."""
    members = ensemble_members(path)
    root = members[0] if members else resolve(path)
    text = _read_bounded(root, CONFIG, MAX_CONFIG_BYTES)
    try:
        plain = yaml.load(text, Loader=_PlainYAML)
        _refuse_interpolations(plain, "")
        raw = OmegaConf.create(plain)
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainApp), raw))
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BundleError(
            f"{root / CONFIG} does not fit the configuration schema: {message}"
        ) from e
    if not isinstance(config, TrainApp):
        raise BundleError(f"{root / CONFIG} is not a training configuration")
    try:
        validate(config)
    except ValueError as e:
        raise BundleError(f"{root / CONFIG}: {e}") from e
    return config


def _refuse_interpolations(value: Any, key: str) -> None:
    """A bundle holds resolved values: a ``${...}`` would read the loading machine's
    environment (``oc.env``) or other keys, so it is refused, never resolved."""
    if isinstance(value, dict):
        for name, item in value.items():
            _refuse_interpolations(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_interpolations(item, f"{key}[{i}]")
    elif isinstance(value, str) and "${" in value:
        raise ValueError(
            f"{key or 'the document'} holds an interpolation (${{...}}); a bundle's "
            "values are literal and none is resolved"
        )


def load(path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    """Load configuration, tokenizer and weights; the model is in eval mode."""
    members = ensemble_members(path)
    if members:
        _check_shared_tokenizer(members)
        loaded = [_load_single(m, device=device) for m in members]
        models = [b.model for b in loaded]
        try:
            ensemble = Ensemble(models).eval()  # type: ignore[arg-type]
        except ValueError as e:
            raise BundleError(f"{path}: {e}") from e
        first = loaded[0]
        return Bundle(first.config, first.tokenizer, ensemble, resolve(path))
    return _load_single(resolve(path), device=device)


def _load_single(root: Path, *, device: str | torch.device) -> Bundle:
    """One model: schema-checked config, checked tokenizer, header-checked weights."""
    config = load_config(root)
    tokenizer = load_tokenizer(root)
    _check_size(root, config, tokenizer)
    try:
        model = build_model(config.model, tokenizer)
    except (RuntimeError, ValueError, TypeError) as e:
        raise BundleError(f"{root / CONFIG}: the model it describes cannot be built: {e}") from e
    weights = _check_weights(root, model.state_dict(), tokenizer)
    try:
        load_model(model, str(weights), device=str(device))
    except (RuntimeError, OSError, ValueError, SafetensorError) as e:
        raise BundleError(f"{weights} does not fit the model: {str(e)[:300]}") from e
    _check_finite(weights, model)
    model.to(device).eval()
    return Bundle(config=config, tokenizer=tokenizer, model=model, path=root)


def _check_finite(weights: Path, model: Seq2Seq) -> None:
    """Refuse NaN or infinite weights (a diverged or damaged model): they would
    translate every line to nothing without an error."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise BundleError(
                    f"{weights}: {name} holds NaN or infinite values; the model is damaged "
                    "(or its training diverged) and cannot translate"
                )


def _check_size(root: Path, config: TrainApp, tokenizer: Tokenizer) -> None:
    """Refuse a config that describes a model far larger than the weights file,
    before a tensor of it is allocated.

    Why a bound and not the exact count: the bound is arithmetic on the config,
    with no module built, and over-counts every layer, so a genuine bundle always
    passes it.
    """
    m = config.model
    width = max(m.embedding_size, m.hidden_size, m.attention_size, 1)
    vocab = tokenizer.src_vocab_size + 2 * tokenizer.tgt_vocab_size + 2
    layers = m.encoder_layers + m.decoder_layers + 4
    bound = 4 * (2 * vocab * width + 32 * layers * width * width)
    weights = _regular_file(root, WEIGHTS, limit=None)
    size = weights.stat().st_size
    if bound > 64 * size + MAX_MODEL_SLACK:
        raise BundleError(
            f"{root / CONFIG} describes a model of up to {bound / 1e9:.1f} GB, far more than "
            f"its weights file ({size / 1e6:.1f} MB): the config does not belong to these weights"
        )


def build_model(cfg: ModelConfig, tokenizer: Tokenizer) -> Seq2Seq:
    """The model ``cfg`` describes, sized by the tokenizer's vocabularies: how
    training builds one and how a bundle is loaded into one."""
    return Seq2Seq.from_config(
        cfg,
        src_vocab=tokenizer.src_vocab_size,
        tgt_vocab=tokenizer.tgt_vocab_size,
        pad_id=PAD_ID,
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The bundle's SentencePiece models, checked against the checksums in
    ``tokenizer.json`` when the bundle has that file (it is optional in the format)."""
    root = resolve(path)
    files = _spm_files(root)
    if set(files) != {SRC_FILE, TGT_FILE}:
        raise BundleError(f"{root} needs {SRC_FILE} and {TGT_FILE}; it has {sorted(files)}")
    if os.path.lexists(root / TOKENIZER_SUMS):
        try:
            sums = json.loads(_read_bounded(root, TOKENIZER_SUMS, MAX_JSON_BYTES))
        except ValueError as e:
            raise BundleError(f"{root / TOKENIZER_SUMS} is not valid JSON: {e}") from e
        for name, data in files.items():
            if not isinstance(sums, dict) or sums.get(name) != hashlib.sha256(data).hexdigest():
                raise BundleError(
                    f"{root / name} is not the tokenizer this model was trained with "
                    f"(its SHA-256 differs from {TOKENIZER_SUMS}; swapped {SRC_FILE}/{TGT_FILE}?)"
                )
    try:
        return Tokenizer.from_serialized(files)
    except ValueError as e:
        raise BundleError(f"{root}: {e}") from e


def _check_weights(root: Path, expected: dict[str, torch.Tensor], tokenizer: Tokenizer) -> Path:
    """The weights file, after its header matched the expected tensors (names,
    shapes, element types, byte ranges) and its size.

    Why read the header first: a wrong-shape or oversized model would otherwise be
    allocated in full before safetensors could complain.
    """
    path = _regular_file(root, WEIGHTS, limit=None)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise BundleError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            found = {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}
            dtypes = {k: str(v["dtype"]) for k, v in tensors.items()}
            spans = sorted(
                (int(v["data_offsets"][0]), int(v["data_offsets"][1]), k)
                for k, v in tensors.items()
            )
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise BundleError(f"{path} has a corrupt safetensors header: {e}") from e
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    for name, shape in found.items():
        if shapes.get(name) != shape:
            vocab = (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
            raise BundleError(
                f"{path}: {name} has shape {list(shape)} but the bundle's config and "
                f"tokenizer (vocabularies {vocab[0]}/{vocab[1]}) give "
                f"{list(shapes[name]) if name in shapes else 'no such weight'}"
            )
    end = _check_spans(path, spans, expected, dtypes)
    if 8 + n + end != size:
        raise BundleError(
            f"{path} has {size} bytes but its header describes {8 + n + end}; truncated or padded"
        )
    return path


def _check_spans(
    path: Path,
    spans: list[tuple[int, int, str]],
    expected: dict[str, torch.Tensor],
    dtypes: dict[str, str],
) -> int:
    """Each tensor's element type is of the model's kind (floating or not) and its
    byte range holds exactly its elements, the ranges tiling the data without gaps
    or overlaps; returns where the data ends."""
    position = 0
    for begin, end, name in spans:
        tensor, dtype = expected[name], dtypes[name]
        if dtype not in _DTYPE_BYTES or (dtype in _FLOAT_DTYPES) != tensor.is_floating_point():
            raise BundleError(
                f"{path}: {name} is stored as {dtype[:20]}, which cannot hold the model's "
                f"{str(tensor.dtype).removeprefix('torch.')} values; corrupt header"
            )
        if begin != position or end - begin != tensor.numel() * _DTYPE_BYTES[dtype]:
            raise BundleError(
                f"{path}: {name} has byte range [{begin}, {end}), which does not hold its "
                f"{tensor.numel()} {dtype} values right after the previous tensor; corrupt header"
            )
        position = end
    return position


def _spm_files(root: Path) -> dict[str, bytes]:
    return {
        name: _read_bounded(root, name, MAX_SPM_BYTES)
        for name in (SRC_FILE, TGT_FILE)
        if os.path.lexists(root / name)
    }


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Metrics records; a torn last line (from a crash mid-append) is skipped."""
    records: list[dict[str, Any]] = []
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
    root = resolve(path)
    if not os.path.lexists(root / TRAINER_STATE):
        return None
    file = _regular_file(root, TRAINER_STATE, limit=None)
    return torch.load(file, map_location="cpu", weights_only=True)
