"""Typed configuration schemas for every Hydra group, and where the YAML lives.

The dataclasses are the single source of truth: YAML files under ``conf/`` only
set values, unknown keys fail when Hydra merges them with these schemas, and
everything below the app layer receives these dataclasses (never a DictConfig).
Hydra itself is imported only by the apps (``seq2seq._hydra`` registers these schemas).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar

MISSING = "???"


# Choices are str-valued Enums (OmegaConf 2.3 has no Literal support): YAML and
# the command line use the plain names, and members compare equal to them.
ChoiceT = TypeVar("ChoiceT", bound="Choice")


class Choice(str, Enum):
    """A config choice that prints and formats as its plain name."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls: type[ChoiceT], value: str, key: str) -> ChoiceT:
        """``value`` as a member, or an error naming the key and the choices."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(str(member.value) for member in cls)
            raise ValueError(f"{key}={value!r}; choose one of {names}") from None


class DataFormat(Choice):
    """Where pairs come from: ``builtin`` (generated), ``text`` (two aligned files),
    one file per split (``tsv``, ``jsonl``, ``parquet``, ``arrow``: an Arrow file or a
    ``datasets`` ``save_to_disk`` directory), or ``hub`` (``datasets.load_dataset``)."""

    builtin = "builtin"
    text = "text"
    tsv = "tsv"
    jsonl = "jsonl"
    parquet = "parquet"
    arrow = "arrow"
    hub = "hub"


class PieceModel(Choice):
    unigram = "unigram"
    bpe = "bpe"


class Cell(Choice):
    gru = "gru"
    lstm = "lstm"
    rnn = "rnn"


class RnnImpl(Choice):
    """Who runs a one-layer GRU's recurrence (``seq2seq.model.gru.recurrence_impl``)."""

    auto = "auto"
    handwritten = "handwritten"
    torch = "torch"


class AttentionKind(Choice):
    bahdanau = "bahdanau"
    luong = "luong"
    none = "none"


class OptimName(Choice):
    adam = "adam"
    adamw = "adamw"


class Schedule(Choice):
    constant = "constant"
    plateau = "plateau"
    warmup = "warmup"
    cosine = "cosine"


class Precision(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Backend(Choice):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class Errors(Choice):
    strict = "strict"
    replace = "replace"  # type: ignore[assignment]  # the member shadows str.replace


def conf_dir() -> str:
    """Absolute path of the Hydra config directory.

    Why one helper: Hydra 1.3 resolves a relative ``config_path`` against the
    source file for ``python -m`` but against the package for console scripts.
    An absolute path is honoured by both. A wheel ships the YAML as
    ``seq2seq/conf``; an editable install reads ``<checkout>/conf``.
    """
    package = Path(__file__).resolve().parent.parent
    shipped = package / "conf"
    if shipped.is_dir():
        return str(shipped)
    return str(package.parent / "conf")


# ----------------------------------------------------------------------------- data


@dataclass
class SplitConfig:
    """Where one split (train / valid / test) comes from.

    ``src``/``tgt`` name two aligned plain-text files (``format=text``);
    ``path`` names one TSV, JSONL, Parquet or Arrow file, a directory of Parquet
    files, or a ``save_to_disk`` directory; ``split`` is the split name on the hub
    (and in a ``save_to_disk`` directory of several splits), ``stem`` the file stem
    inside ``DataConfig.dir`` (``{dir}/{stem}.{lang}[.gz]``).
    """

    src: str | None = None
    tgt: str | None = None
    path: str | None = None
    split: str | None = None
    stem: str | None = None


@dataclass
class BuiltinConfig:
    """Size and seed of the generated offline corpus (see ``seq2seq.data.builtin``)."""

    train_size: int = 20000
    valid_size: int = 500
    test_size: int = 500
    seed: int = 1


@dataclass
class DataConfig:
    """Which parallel corpus to read and how to filter it for training."""

    format: DataFormat = DataFormat.builtin
    name: str = "builtin"
    src_lang: str = "en"
    tgt_lang: str = "de"
    hub_name: str | None = None
    hub_config: str | None = None
    # Read the hub dataset as a stream (no local Arrow copy), for the largest corpora.
    hub_streaming: bool = False
    dir: str | None = None
    train: SplitConfig = field(default_factory=lambda: SplitConfig(split="train", stem="train"))
    valid: SplitConfig = field(
        default_factory=lambda: SplitConfig(split="validation", stem="valid")
    )
    test: SplitConfig = field(default_factory=lambda: SplitConfig(split="test", stem="test"))
    builtin: BuiltinConfig = field(default_factory=BuiltinConfig)
    max_length: int = 100
    max_ratio: float = 3.0
    # Drop malformed rows (wrong field count, bad JSON or UTF-8, missing side), counted
    # and named in the log and metrics.jsonl; by default the first one stops the run.
    skip_bad_rows: bool = False
    # Token store of the encoded training split; None: "tokens" beside tokenizer.cache_dir.
    cache_dir: str | None = None
    num_workers: int = 0  # threads encoding the training split; 0 = one per core


# ------------------------------------------------------------------------ tokenizer


@dataclass
class TokenizerConfig:
    """SentencePiece settings; trained on the training split only, then cached."""

    model_type: PieceModel = PieceModel.unigram
    vocab_size: int = 8000
    joint: bool = False
    character_coverage: float = 1.0
    cache_dir: str = "~/.cache/seq2seq/spm"
    # Subword regularisation of the training pairs: each epoch a fresh segmentation,
    # seeded by train.seed, the epoch and the pair; validation, test, translation and
    # the service always take the best one. 0 turns it off. Unigram: SentencePiece's
    # smoothing exponent over all segmentations (smaller samples more widely); bpe:
    # the probability of dropping each merge (BPE-dropout).
    sampling_alpha: float = 0.0


# ---------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """Sizes and variants of the encoder-decoder; vocabularies come from code."""

    cell: Cell = Cell.gru
    attention: AttentionKind = AttentionKind.bahdanau
    embedding_size: int = 256
    hidden_size: int = 512
    encoder_layers: int = 1
    decoder_layers: int = 1
    attention_size: int = 256
    dropout: float = 0.3
    # Whole source and target-input token embeddings dropped in training (0: off).
    word_dropout: float = 0.0
    tie_embeddings: bool = True
    share_embeddings: bool = False
    softmax_head: int = (
        0  # > 0: two-level softmax with this many head pieces (seq2seq.model.softmax)
    )
    # Which code runs a one-layer GRU's recurrence: seq2seq.model.gru's hand-written
    # loop, PyTorch's nn.GRU (cuDNN's fused kernels on CUDA), or auto: the one measured
    # faster on the device. Same parameters and results either way, so a checkpoint
    # resumes and a bundle loads under any of them.
    rnn_impl: RnnImpl = RnnImpl.auto


# ------------------------------------------------------------------------- training


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: OptimName = OptimName.adam
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.plateau
    warmup_steps: int = 0
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        self.check("optim")

    def check(self, prefix: str) -> None:
        """A warm-up schedule needs warm-up steps (checked as soon as one is built)."""
        if self.schedule == Schedule.warmup and self.warmup_steps < 1:
            key = f"{prefix}." if prefix else ""
            raise ValueError(
                f"{key}schedule=warmup needs {key}warmup_steps >= 1 (the steps of linear "
                f"warm-up), got {self.warmup_steps}; for a fixed rate use {key}schedule=constant"
            )


@dataclass
class TrainingConfig:
    """The training loop: batches, budgets, validation, early stopping.

    ``ensemble`` > 1 trains that many members one after another (seeds ``seed``,
    ``seed + 1``, ...; each in ``run_dir/memberK`` with an even share of the time
    left, so ``max_time`` stays the whole run's budget) and writes ``best`` as an
    ensemble bundle that decodes with all of them. ``ensemble_parallel`` = N trains
    N members at once, each in a process of its own with cores/N threads (the whole
    time budget split among the waves of N), which on a CPU gives each member most of
    the steps a single model would get.

    ``resume=true`` (the default) continues from the newest complete checkpoint in
    ``run_dir`` with the checkpoint's tokenizer; it refuses when the data, tokenizer
    or model settings differ from the run's, or when the directory holds earlier
    work but no checkpoint. Other changed settings (e.g. ``optim.lr``,
    ``train.max_steps``) take effect and are logged. A run that finished under the
    current budgets returns without training. ``resume=false`` starts a fresh run
    in ``run_dir``: the old checkpoint and snapshots go, ``best`` stays until a
    better model replaces it.
    """

    max_tokens: int = 4000
    teacher_forcing: float = 1.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_steps: int = 0
    max_epochs: int = 0
    max_time: float = 0.0
    valid_every: int = 500
    valid_max_sentences: int = 0
    patience: int = 5
    average_last: int = 0
    log_every: int = 50
    seed: int = 1234
    device: str = "auto"
    threads: int = 0  # 0: torch's default; under torchrun, the machine's cores / its processes
    precision: Precision = Precision.auto
    resume: bool = True
    ensemble: int = 1
    # Members trained at once, each in a process of its own with cores/N threads.
    ensemble_parallel: int = 1
    # Batches per optimiser step in each process; the update is normalised by all
    # their target tokens, so N processes under torchrun equal one with accumulate=N.
    accumulate: int = 1
    # Under torchrun: gloo on CPU, NCCL on CUDA for auto; how long (seconds) the
    # other processes wait for rank 0 (validation, checkpoints) before failing.
    backend: Backend = Backend.auto
    timeout: float = 1800.0


# ---------------------------------------------------------------------------- search


@dataclass
class DecodeConfig:
    """How to search: beam size, batching, length handling."""

    beam_size: int = 5
    batch_size: int = 64
    nbest: int = 1
    alpha: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_input_tokens: int = 250
    precision: Precision = Precision.fp32
    # Batches searched at once, each on its own share of the intra-op threads;
    # 0 = one per thread on CPU (one on CUDA). Outputs do not depend on it.
    workers: int = 0


# ------------------------------------------------------------------------- primaries


@dataclass
class TrainApp:
    """``seq2seq-train``: corpus -> tokenizer -> model -> trainer -> bundle."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    run_dir: str = MISSING


@dataclass
class TranslateApp:
    """``seq2seq-translate``: bundle + input lines -> one output line per input line."""

    model: str = MISSING
    input: str | None = None
    output: str | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    scores: bool = False
    alignments: str | None = None
    attention_plot: str | None = None
    chunk_size: int = 10000
    errors: Errors = Errors.strict
    device: str = "auto"
    threads: int = 0
    # "K/N": translate only the K-th of N contiguous line ranges (1 <= K <= N), for
    # schedulers without torchrun; the N outputs concatenated in order equal one run's.
    shard: str | None = None


@dataclass
class EvaluateApp:
    """``seq2seq-evaluate``: hypotheses (or bundle + source) and references -> metrics."""

    hyp: str | None = None
    ref: list[str] = field(default_factory=list)
    model: str | None = None
    src: str | None = None
    lowercase: bool = False
    tokenize: str = "13a"
    json: str | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    device: str = "auto"
    threads: int = 0


@dataclass
class ServeApp:
    """``seq2seq-serve``: a bundle behind an HTTP API with live batching.

    Requests wait in one queue; each of ``workers`` search threads runs a live batch
    that waiting sentences with its decoding settings enter at every decoding step
    (up to ``max_batch_sentences`` sentences and ``max_batch_tokens`` source pieces)
    and finished ones leave. A search stops taking new sentences once a request with
    other settings has waited ``max_wait_ms``, so no setting starves another.
    ``max_queue`` bounds the sentences waiting (503 beyond it); ``timeout`` bounds a
    request's wait for its answer in seconds (504). Each search runs on ``threads``
    torch threads (``workers`` 0: one search thread per CPU core). One worker by
    default: a step costs nearly the same for 32 sentences as for 16, so one batch of
    all the waiting sentences needs less CPU than two halves side by side.
    """

    model: str = MISSING
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # else SEQ2SEQ_API_KEY; set: requests need a Bearer token
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    max_batch_sentences: int = 64
    max_batch_tokens: int = 2000
    max_wait_ms: float = 50.0
    max_queue: int = 256
    timeout: float = 30.0
    max_chars: int = 1000
    max_lines: int = 64
    max_body_bytes: int = 262144
    max_beam_size: int = 10
    workers: int = 1
    device: str = "auto"
    threads: int = 1
    log_level: str = "info"  # one of LOG_LEVELS
    # Slow or stalled clients: a request's head must arrive within header_timeout
    # seconds of the connection being ready for it, its body within body_timeout;
    # an idle kept-alive connection closes after keep_alive_timeout. At most
    # max_connections are open at once (more are refused at accept), so stalled
    # clients cannot use up the process's file descriptors.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 512
    max_header_bytes: int = 16384
    # On SIGTERM, connections still open after drain_timeout seconds are cut.
    drain_timeout: float = 30.0
