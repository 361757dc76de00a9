"""What the Hydra apps share: schema registration and how an expected failure ends.

Why one place: every app must treat a user's mistake the same way (one
``error: ...`` line on stderr and exit code 2, never a traceback), while a
real bug keeps its traceback. Hydra's own configuration errors (unknown key,
bad override, wrong type, missing group option) count as mistakes too:
`run_hydra` turns them into the same line, where Hydra would print several
lines and exit with 1. Only the apps import this module, so the
library below them never loads Hydra.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar, cast

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from seq2seq.config import EvaluateApp, ServeApp, TrainApp, TranslateApp, validate

T = TypeVar("T")

# A user's mistake, as the library raises it: bad config values, data, bundles
# and input are ValueErrors (CorpusError, BundleError, InputError ...), missing
# or unreadable files are OSErrors, a missing optional package an ImportError.
EXPECTED = (ValueError, OSError, ImportError)
USAGE_ERROR = 2
FULL_ERROR = "HYDRA_FULL_ERROR"
# Whether the user asked for tracebacks; `run_hydra` sets FULL_ERROR for Hydra
# itself, so the user's own setting is remembered here.
_tracebacks: list[bool] = []


def register_configs() -> None:
    """Register the schemas so Hydra validates every YAML file against them."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainApp)
    cs.store(name="translate_schema", node=TranslateApp)
    cs.store(name="evaluate_schema", node=EvaluateApp)
    cs.store(name="serve_schema", node=ServeApp)


def fail(message: str) -> NoReturn:
    """End the app with one ``error:`` line and the usage exit code.

    Why one ``os.write`` of the whole line: processes under torchrun share stderr,
    and a line written in pieces (or after another process's unfinished progress
    bar) would run into theirs; a single short write to a pipe is never split.
    """
    line = " ".join(f"error: {message}".split("\n")) + "\n"
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (OSError, ValueError):  # a stream without a descriptor (captured, redirected)
        sys.stderr.write(line)
        sys.stderr.flush()
    else:
        os.write(fd, line.encode("utf-8", "backslashreplace"))
    sys.exit(USAGE_ERROR)


@contextmanager
def expected_errors() -> Iterator[None]:
    """Turn an expected failure into one ``error:`` line and exit code 2.

    ``HYDRA_FULL_ERROR=1`` keeps the traceback, as for Hydra's own errors. A
    reader that goes away (``| head``) ends the app quietly, like other filters.
    """
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except EXPECTED as e:
        if _tracebacks_wanted():
            raise
        fail(one_line(e) if isinstance(e, OmegaConfBaseException) else str(e) or type(e).__name__)


def _tracebacks_wanted() -> bool:
    return _tracebacks[-1] if _tracebacks else os.environ.get(FULL_ERROR) == "1"


def run_hydra(app: Callable[[], None]) -> None:
    """Call a ``hydra.main`` app; Hydra's configuration errors end as one ``error:``
    line and exit code 2 (with ``HYDRA_FULL_ERROR=1``: Hydra's traceback).

    Why through FULL_ERROR: with it set, Hydra re-raises the original exception
    instead of printing it and exiting, so it can be caught here and worded once.
    """
    _tracebacks.append(os.environ.get(FULL_ERROR) == "1")
    previous = os.environ.get(FULL_ERROR)
    os.environ[FULL_ERROR] = "1"
    try:
        app()
    except (HydraException, OmegaConfBaseException, *EXPECTED) as e:
        # An expected error out here came from Hydra's own setup, e.g. a run_dir
        # that is a file; the app's errors were already handled inside.
        if _tracebacks[-1]:
            raise
        fail(_unknown_key_message(e) or one_line(e))
    finally:
        _tracebacks.pop()
        if previous is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = previous


def one_line(error: BaseException) -> str:
    """Hydra's and OmegaConf's several-line messages (and their cause's) as one line,
    without the internal detail lines (``full_key:``, ``object_type=``, search path)."""
    parts: list[str] = []
    for e in (error, error.__cause__):
        for line in str(e or "").splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            internal = line.startswith(("full_key:", "object_type=", "reference_type="))
            if line and not internal and line not in parts:
                parts.append(line)
    return " ".join(parts) or type(error).__name__


def unknown_key(key: str, schema: Any) -> str:
    """The message for ``key`` (dotted), which ``schema``'s dataclass lacks, naming
    the nearest valid key."""
    prefix, _, name = key.rpartition(".")
    valid = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    within = f"{prefix}." if prefix else ""
    scored = [(_likeness(name, v), v) for v in valid]
    best = max(scored, default=(0.0, ""))
    if best[0] >= 0.6:
        return f"unknown key {key}; did you mean {within}{best[1]}?"
    where = f"{prefix} has" if prefix else "the keys are"
    return f"unknown key {key}; {where} {', '.join(valid)}"


def _likeness(typed: str, valid: str) -> float:
    """How alike two key names are, also word by word (``beem`` is near ``beam_size``)."""
    return max(
        difflib.SequenceMatcher(None, typed, candidate).ratio()
        for candidate in (valid, *valid.split("_"))
    )


def _unknown_key_message(error: BaseException) -> str | None:
    """Hydra's refusal of an unknown key (which suggests ``+key=`` and so would add
    the misspelled key) as `unknown_key`'s message; None for other errors."""
    cause = error.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        schema = getattr(cause, "object_type", None)
        if dataclasses.is_dataclass(schema):
            return unknown_key(str(cause.full_key), schema)
    return None


def check_keys(cfg: DictConfig, schema: Any, prefix: str = "") -> None:
    """Refuse keys the schema does not have, e.g. added with ``+key=value`` (Hydra
    accepts those into a structured config, and they would be ignored silently)."""
    names = {f.name for f in dataclasses.fields(schema)}
    for key in map(str, cfg):
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ValueError(unknown_key(full, schema))
        child = OmegaConf.get_type(cfg, key)
        if child is not None and dataclasses.is_dataclass(child):
            check_keys(cfg[key], child, full)


def to_app(
    cfg: DictConfig, schema: Callable[..., T], *, required: dict[str, str] | None = None
) -> T:
    """The typed app config, after naming any required key the user left out, any
    key the schema lacks and any value out of its range.

    Args:
        required: key -> what to pass, e.g. ``{"model": "BUNDLE"}``.
    """
    check_keys(cfg, schema)
    for key, what in (required or {}).items():
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(f"no {key} given; pass {key}={what}")
    config = OmegaConf.to_object(cfg)
    if not isinstance(config, schema):  # type: ignore[arg-type]
        raise TypeError(f"expected {schema}, got {type(config)}")
    validate(config)
    return cast(T, config)
