"""Configuration: typed schemas for every Hydra group, and the ranges they are
checked against.

The dataclasses (`schemas`) are the single source of truth: YAML files under
``conf/`` only set values, unknown keys fail when Hydra merges them with these
schemas, and everything below the app layer receives these dataclasses (never a
DictConfig). `ranges` checks every numeric setting at start. Hydra itself is
imported only by the apps (``seq2seq._hydra`` registers the schemas).
"""

from seq2seq.config.ranges import LOG_LEVELS, RANGES, Range, validate
from seq2seq.config.schemas import (
    MISSING,
    AttentionKind,
    Backend,
    BuiltinConfig,
    Cell,
    Choice,
    DataConfig,
    DataFormat,
    DecodeConfig,
    Errors,
    EvaluateApp,
    ModelConfig,
    OptimConfig,
    OptimName,
    PieceModel,
    Precision,
    RnnImpl,
    Schedule,
    ServeApp,
    SplitConfig,
    TokenizerConfig,
    TrainApp,
    TrainingConfig,
    TranslateApp,
    conf_dir,
)

__all__ = [
    "LOG_LEVELS",
    "MISSING",
    "RANGES",
    "AttentionKind",
    "Backend",
    "BuiltinConfig",
    "Cell",
    "Choice",
    "DataConfig",
    "DataFormat",
    "DecodeConfig",
    "Errors",
    "EvaluateApp",
    "ModelConfig",
    "OptimConfig",
    "OptimName",
    "PieceModel",
    "Precision",
    "Range",
    "RnnImpl",
    "Schedule",
    "ServeApp",
    "SplitConfig",
    "TokenizerConfig",
    "TrainApp",
    "TrainingConfig",
    "TranslateApp",
    "conf_dir",
    "validate",
]
