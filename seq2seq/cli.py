"""What the Hydra apps share: schema registration and how an expected failure ends.

Why one place: every app must treat a user's mistake the same way (one
``error: ...`` line on stderr and exit code 2, never a traceback), while a
real bug keeps its traceback. Only the apps import this module, so the
library below them never loads Hydra.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from seq2seq.config import EvaluateApp, ServeApp, TrainApp, TranslateApp

T = TypeVar("T")

# A user's mistake, as the library raises it: bad config values, data, bundles
# and input are ValueErrors (CorpusError, BundleError, InputError ...), missing
# or unreadable files are OSErrors, a missing optional package an ImportError.
EXPECTED = (ValueError, OSError, ImportError)
USAGE_ERROR = 2


def register_configs() -> None:
    """Register the schemas so Hydra validates every YAML file against them."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainApp)
    cs.store(name="translate_schema", node=TranslateApp)
    cs.store(name="evaluate_schema", node=EvaluateApp)
    cs.store(name="serve_schema", node=ServeApp)


def fail(message: str) -> NoReturn:
    """End the app with one ``error:`` line and the usage exit code."""
    print(f"error: {message}", file=sys.stderr)
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
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(e) or type(e).__name__)


def to_app(cfg: DictConfig, schema: Callable[..., T], *, required: tuple[str, ...] = ()) -> T:
    """The typed app config, after naming any required key the user left out."""
    for key in required:
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(f"no {key} given; pass {key}=...")
    config = OmegaConf.to_object(cfg)
    if not isinstance(config, schema):  # type: ignore[arg-type]
        raise TypeError(f"expected {schema}, got {type(config)}")
    return config
