"""Ranges of every numeric setting, checked at start.

Why a table: a value that cannot work (a zero divisor, a negative budget, NaN)
must fail before anything runs, with one line naming its key, instead of deep
inside a run or, worse, not at all. Every numeric field of every schema has a
range here (a test checks that none is missing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from seq2seq.config.schemas import (
    BuiltinConfig,
    DataConfig,
    DecodeConfig,
    EvaluateApp,
    ModelConfig,
    OptimConfig,
    PieceModel,
    Schedule,
    ServeApp,
    TokenizerConfig,
    TrainApp,
    TrainingConfig,
    TranslateApp,
)


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field: ``low <= value <= high`` (either end
    excluded when ``*_open``, absent when None); NaN and infinity never pass."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def check(self, key: str, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"{key}={value}; it must be a finite number")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        if below or above:
            hint = f"; {self.hint}" if self.hint else ""
            raise ValueError(f"{key}={value}; it must be {self.describe()}{hint}")

    def describe(self) -> str:
        low = None if self.low is None else _plain(self.low)
        high = None if self.high is None else _plain(self.high)
        if low is not None and high is not None:
            left = "above" if self.low_open else "from"
            right = "below" if self.high_open else "to"
            return f"{left} {low} {right} {high}"
        if low is not None:
            return f"above {low}" if self.low_open else f"at least {low}"
        return f"below {high}" if self.high_open else f"at most {high}"


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)  # a probability or share, both ends allowed
SEED = Range(0, 2**32 - 1)
THREADS = Range(0, 4096, hint="0 picks a default")
SIZE = Range(1, 1 << 20)  # widths, vocabularies: far beyond any model, far below overflow

RANGES: dict[type, dict[str, Range]] = {
    BuiltinConfig: {
        "train_size": AT_LEAST_1,
        "valid_size": AT_LEAST_0,
        "test_size": AT_LEAST_0,
        "seed": SEED,
    },
    DataConfig: {
        "max_length": Range(0, hint="0 turns the filter off"),
        "max_ratio": Range(0, hint="0 turns the filter off"),
        "num_workers": THREADS,
    },
    TokenizerConfig: {
        "vocab_size": Range(8, 1 << 20),
        "character_coverage": Range(0, 1, low_open=True),
        "sampling_alpha": Range(0, hint="0 turns subword sampling off"),
    },
    ModelConfig: {
        "embedding_size": SIZE,
        "hidden_size": SIZE,
        "encoder_layers": Range(1, 64),
        "decoder_layers": Range(1, 64),
        "attention_size": SIZE,
        "dropout": Range(0, 1, high_open=True),
        "word_dropout": Range(0, 1, high_open=True),
        "softmax_head": Range(0, 1 << 20, hint="0 keeps the plain softmax"),
    },
    OptimConfig: {
        "lr": POSITIVE,
        "beta1": Range(0, 1, high_open=True),
        "beta2": Range(0, 1, high_open=True),
        "weight_decay": AT_LEAST_0,
        "warmup_steps": AT_LEAST_0,
        "plateau_factor": Range(0, 1, low_open=True, high_open=True),
        "plateau_patience": AT_LEAST_0,
        "min_lr": AT_LEAST_0,
    },
    TrainingConfig: {
        "max_tokens": AT_LEAST_1,
        "teacher_forcing": FRACTION,
        "label_smoothing": Range(0, 1, high_open=True),
        "clip_norm": Range(0, hint="0 turns clipping off"),
        "max_steps": Range(0, hint="0 sets no step limit"),
        "max_epochs": Range(0, hint="0 sets no epoch limit"),
        "max_time": Range(0, hint="0 sets no time limit"),
        "valid_every": AT_LEAST_1,
        "valid_max_sentences": Range(0, hint="0 validates on the whole set"),
        "patience": Range(0, hint="0 turns early stopping off"),
        "average_last": AT_LEAST_0,
        "log_every": AT_LEAST_1,
        "seed": SEED,
        "threads": THREADS,
        "ensemble": Range(1, 1024),
        "ensemble_parallel": Range(1, 1024),
        "accumulate": Range(1, 1 << 16),
        "timeout": POSITIVE,
    },
    DecodeConfig: {
        "beam_size": Range(1, 1024),
        "batch_size": Range(1, 1 << 20),
        "nbest": AT_LEAST_1,
        "alpha": AT_LEAST_0,
        # a * source length + b output tokens: longer limits only allocate.
        "max_len_a": Range(0, 16),
        "max_len_b": Range(0, 4096),
        "max_input_tokens": Range(0, hint="use 0 for no limit"),
        "workers": Range(0, 4096, hint="use 0 for one per CPU thread"),
    },
    TranslateApp: {"chunk_size": Range(1, 1 << 24), "threads": THREADS},
    EvaluateApp: {"threads": THREADS},
    ServeApp: {
        "port": Range(0, 65535, hint="0 picks a free port"),
        "max_batch_sentences": AT_LEAST_1,
        "max_batch_tokens": AT_LEAST_1,
        "max_wait_ms": AT_LEAST_0,
        "max_queue": AT_LEAST_1,
        "timeout": POSITIVE,
        "max_chars": AT_LEAST_1,
        "max_lines": AT_LEAST_1,
        "max_body_bytes": AT_LEAST_1,
        "max_beam_size": Range(1, 1024),
        "workers": Range(0, 4096, hint="use 0 for one per CPU core"),
        "threads": THREADS,
        "header_timeout": POSITIVE,
        "body_timeout": POSITIVE,
        "keep_alive_timeout": POSITIVE,
        "max_connections": Range(1, 1 << 20),
        "max_header_bytes": Range(1024, 1 << 24),
        "drain_timeout": AT_LEAST_0,
    },
}
# Integers beyond this reach torch or numpy as overflow errors, never as settings.
MAX_INT = 2**63 - 1


def validate(config: Any, prefix: str = "") -> None:
    """Check every numeric field of a schema dataclass (recursively) against its
    range in `RANGES`, then the rules between fields.

    Args:
        config: an instance of one of the schemas above.
        prefix: the key the instance sits under, e.g. ``"decode"``.

    Raises:
        ValueError: one line naming the first bad key, its value and what it must be.
    """
    ranges = RANGES.get(type(config), {})
    for f in fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(value):
            validate(value, key)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            continue
        elif isinstance(value, int) and abs(value) > MAX_INT:
            raise ValueError(f"{key}={value}; it is too large")
        elif f.name in ranges:
            ranges[f.name].check(key, value)
        elif not math.isfinite(value):
            raise ValueError(f"{key}={value}; it must be a finite number")
    check = _CROSS_CHECKS.get(type(config))
    if check is not None:
        check(config, prefix)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_decode_fields(decode: DecodeConfig, prefix: str) -> None:
    if decode.nbest > decode.beam_size:
        raise ValueError(
            f"{_key(prefix, 'nbest')}={decode.nbest} must be between 1 and "
            f"{_key(prefix, 'beam_size')}={decode.beam_size}; raise {_key(prefix, 'beam_size')}"
        )
    if decode.max_len_a == 0 and decode.max_len_b == 0:
        raise ValueError(
            f"{_key(prefix, 'max_len_a')}=0 and {_key(prefix, 'max_len_b')}=0 leave no room "
            "for output"
        )


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _check_serve(config: ServeApp, prefix: str) -> None:
    if config.log_level not in LOG_LEVELS:
        raise ValueError(
            f"{_key(prefix, 'log_level')}={config.log_level!r}; use one of {', '.join(LOG_LEVELS)}"
        )
    if config.max_beam_size < config.decode.beam_size:
        raise ValueError(
            f"max_beam_size={config.max_beam_size} is below "
            f"decode.beam_size={config.decode.beam_size}; raise max_beam_size"
        )


def _check_data(data: DataConfig, prefix: str) -> None:
    if 0 < data.max_ratio < 1:
        raise ValueError(
            f"{_key(prefix, 'max_ratio')}={data.max_ratio}; a ratio of the longer side to "
            "the shorter is at least 1 (use 0 to turn the filter off)"
        )


def _check_tokenizer(tokenizer: TokenizerConfig, prefix: str) -> None:
    if tokenizer.model_type == PieceModel.bpe and tokenizer.sampling_alpha >= 1:
        raise ValueError(
            f"{_key(prefix, 'sampling_alpha')}={tokenizer.sampling_alpha}; with "
            f"{_key(prefix, 'model_type')}=bpe it is the probability of dropping a merge "
            "and must be below 1 (0 turns BPE-dropout off)"
        )


def _check_train_app(app: TrainApp, prefix: str) -> None:
    if app.optim.schedule == Schedule.cosine and app.optim.warmup_steps >= app.train.max_steps:
        raise ValueError(
            f"{_key(prefix, 'optim.schedule')}=cosine decays the rate over the step budget: "
            f"{_key(prefix, 'train.max_steps')}={app.train.max_steps} must exceed "
            f"{_key(prefix, 'optim.warmup_steps')}={app.optim.warmup_steps}"
        )


_CROSS_CHECKS: dict[type, Callable[[Any, str], None]] = {
    DataConfig: _check_data,
    TokenizerConfig: _check_tokenizer,
    DecodeConfig: _check_decode_fields,
    OptimConfig: OptimConfig.check,
    ServeApp: _check_serve,
    TrainApp: _check_train_app,
}
