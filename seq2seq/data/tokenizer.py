"""SentencePiece subword models: train on the training split, cache, encode, decode.

Why these choices:

* Fixed special ids (pad 0, unk 1, bos 2, eos 3) in every model, so batching,
  the model and search can use constants instead of asking the tokenizer.
* Training happens in memory (no temporary corpus file), with one thread and no
  shuffling, so the same lines and settings always give byte-identical models.
* The training lines are a seeded reservoir sample of at most
  ``MAX_TRAINING_LINES`` pairs, read in one pass: memory stays bounded however
  large the corpus, and a corpus below the cap is used whole, in order.
* A cache keyed by a hash of the training data (its lines, or a corpus
  fingerprint for streamed files) and the settings makes a second run on the
  same data start instantly; its files are written whole or not at all
  (`seq2seq.runtime.fs`), so an interrupted run never leaves a half-written model.
* ``hard_vocab_limit=False``: a small corpus cannot fill a large vocabulary, and
  that must shrink the vocabulary, not fail the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from seq2seq.config import TokenizerConfig
from seq2seq.runtime.fs import write_bytes

logger = logging.getLogger(__name__)

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
SPECIAL_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID))  # removed when decoding (unk is kept)

SRC_FILE = "src.spm"
TGT_FILE = "tgt.spm"
CACHE_SUMS = "sums.json"  # the cached models' SHA-256, written after them
# Per model; beyond that a seeded sample is used. SentencePiece's training memory
# grows with its input, and a larger sample barely changes a vocabulary of this size,
# so a corpus of millions of pairs starts training within the memory of a small one.
MAX_TRAINING_LINES = 400_000
SAMPLE_SEED = 0
_CACHE_VERSION = "1"  # bump when the training arguments below change


def _as_list(lines: Sequence[str]) -> list[str]:
    """A plain list; slicing first because iterating a ``datasets`` Column row by row is
    slow, while ``column[:]`` converts it in one go."""
    return lines if isinstance(lines, list) else list(lines[:])


# Below this many lines, SentencePiece's batch calls cost more than a loop: each
# starts and joins a thread pool, which dwarfs encoding or decoding one sentence.
SMALL_BATCH = 16


def _encode(processor: spm.SentencePieceProcessor, lines: Sequence[str]) -> list[list[int]]:
    lines = _as_list(lines)
    if len(lines) < SMALL_BATCH:
        return [processor.encode(line, out_type=int) for line in lines]
    return processor.encode(lines, out_type=int)


class Tokenizer:
    """Source and target SentencePiece models (one shared model when ``joint``)."""

    def __init__(self, src: spm.SentencePieceProcessor, tgt: spm.SentencePieceProcessor) -> None:
        for side, processor in (("source", src), ("target", tgt)):
            ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
            if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
                raise ValueError(
                    f"{side} SentencePiece model has special ids (pad, unk, bos, eos) = {ids}, "
                    f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; train it with train_or_load"
                )
        self.src = src
        self.tgt = tgt
        self.joint = src is tgt

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, lines: Sequence[str]) -> list[list[int]]:
        """Piece ids of each source line; no bos/eos (batching adds what it needs)."""
        return _encode(self.src, lines)

    def encode_tgt(self, lines: Sequence[str]) -> list[list[int]]:
        """Piece ids of each target line; no bos/eos."""
        return _encode(self.tgt, lines)

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Detokenised target lines; pad, bos and eos ids are dropped wherever they are."""
        cleaned = [[int(i) for i in row if int(i) not in SPECIAL_IDS] for row in ids]
        if len(cleaned) < SMALL_BATCH:
            return [self.tgt.decode(row) for row in cleaned]
        return self.tgt.decode(cleaned)

    def src_pieces(self, line: str) -> list[str]:
        """Source pieces of ``line``, aligned with ``encode_src([line])[0]``."""
        return self.src.encode(line, out_type=str)

    def tgt_pieces(self, ids: Sequence[int]) -> list[str]:
        """Target pieces of ``ids`` (special ids included, e.g. "</s>"), for plots."""
        return [self.tgt.id_to_piece(int(i)) for i in ids]

    def serialize(self) -> dict[str, bytes]:
        """Model files as bytes: {"src.spm": ..., "tgt.spm": ...} (equal bytes when joint)."""
        return {
            SRC_FILE: self.src.serialized_model_proto(),
            TGT_FILE: self.tgt.serialized_model_proto(),
        }

    @classmethod
    def from_serialized(cls, files: dict[str, bytes]) -> Tokenizer:
        """Inverse of ``serialize``; identical bytes give one shared (joint) model."""
        missing = [name for name in (SRC_FILE, TGT_FILE) if name not in files]
        if missing:
            raise ValueError(f"tokenizer files missing: {missing}; got {sorted(files)}")
        src = _load_model(files[SRC_FILE], SRC_FILE)
        if files[TGT_FILE] == files[SRC_FILE]:
            return cls(src, src)
        return cls(src, _load_model(files[TGT_FILE], TGT_FILE))


def _load_model(proto: bytes, name: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{name} is not a valid SentencePiece model ({len(proto)} bytes)") from e


# ----------------------------------------------------------------------- training


def _settings_digest(cfg: TokenizerConfig) -> hashlib._Hash:
    digest = hashlib.sha256()
    # str(): an enum member and its plain name must give the same key.
    settings = (_CACHE_VERSION, cfg.model_type, cfg.vocab_size, cfg.joint, cfg.character_coverage)
    digest.update(repr(tuple(str(value) for value in settings)).encode())
    return digest


def cache_key(src_lines: Sequence[str], tgt_lines: Sequence[str], cfg: TokenizerConfig) -> str:
    """Hash of everything that determines the trained models (not ``cache_dir``)."""
    digest = _settings_digest(cfg)
    for side in (src_lines, tgt_lines):
        digest.update(f"\0side {len(side)}\0".encode())
        for line in side:
            digest.update(line.encode("utf-8", "surrogatepass"))
            digest.update(b"\0")
    return digest.hexdigest()[:32]


def source_cache_key(fingerprint: str, cfg: TokenizerConfig) -> str:
    """Cache key for a corpus known by its fingerprint (see ``corpus.PairSource``),
    so a cached tokenizer is found without reading the corpus."""
    digest = _settings_digest(cfg)
    digest.update(f"\0source {fingerprint} {MAX_TRAINING_LINES} {SAMPLE_SEED}".encode())
    return digest.hexdigest()[:32]


def reservoir_sample(
    pairs: Iterable[tuple[str, str]], size: int, seed: int = SAMPLE_SEED
) -> tuple[list[str], list[str], int]:
    """A uniform sample of at most ``size`` pairs, in one pass (Vitter's Algorithm R).

    Returns the sampled source and target sides and the number of pairs seen.
    With ``size`` or fewer pairs, every pair is kept in corpus order.
    """
    rng = random.Random(seed)
    sample: list[tuple[str, str]] = []
    seen = 0
    for seen, pair in enumerate(pairs, start=1):
        if seen <= size:
            sample.append(pair)
        else:
            slot = rng.randrange(seen)
            if slot < size:
                sample[slot] = pair
    return [s for s, _ in sample], [t for _, t in sample], seen


def _train(lines: Sequence[str], cfg: TokenizerConfig, side: str) -> bytes:
    """One model trained in memory; returns its serialized bytes."""
    if not any(line.strip() for line in lines):
        raise ValueError(f"cannot train the {side} tokenizer: no non-empty training lines")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=str(cfg.model_type),
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            hard_vocab_limit=False,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            input_sentence_size=0,  # 0 = all lines given (already capped by the sample)
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training failed for the {side} side ({len(lines)} lines, "
            f"tokenizer.model_type={cfg.model_type}, tokenizer.vocab_size={cfg.vocab_size}): {e}"
        ) from e
    return model.getvalue()


def _load_cached(directory: Path) -> Tokenizer | None:
    """The cached tokenizer in ``directory``, or None when absent or unreadable."""
    files = {name: directory / name for name in (SRC_FILE, TGT_FILE)}
    if not all(path.is_file() for path in files.values()):
        return None
    try:
        data = {n: p.read_bytes() for n, p in files.items()}
        _check_sums(directory, data)
        tokenizer = Tokenizer.from_serialized(data)
    except (OSError, ValueError) as e:
        logger.warning("training again: ignoring the cached tokenizer in %s: %s", directory, e)
        return None
    logger.info("loaded cached tokenizer from %s", directory)
    return tokenizer


def _write_cache(directory: Path, files: dict[str, bytes]) -> None:
    """The models, then their SHA-256 sums (last, so that sums mean a whole cache)."""
    for name, data in files.items():
        write_bytes(directory / name, data)
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    write_bytes(directory / CACHE_SUMS, json.dumps(sums, indent=2).encode() + b"\n")


def _check_sums(directory: Path, files: dict[str, bytes]) -> None:
    """Refuse (ValueError) cached models that are not the ones written there: swapped,
    replaced or damaged, or from a cache without sums, whose models nothing vouches for.
    The caller trains them again."""
    try:
        sums = json.loads((directory / CACHE_SUMS).read_bytes())
    except FileNotFoundError:
        raise ValueError(f"no {CACHE_SUMS} to check its models against") from None
    for name, data in files.items():
        if not isinstance(sums, dict) or sums.get(name) != hashlib.sha256(data).hexdigest():
            raise ValueError(f"{directory / name} does not match its SHA-256 in {CACHE_SUMS}")


def train_or_load(
    src_lines: Sequence[str], tgt_lines: Sequence[str], cfg: TokenizerConfig
) -> Tokenizer:
    """Tokenizer for these training lines: from the cache, or trained and then cached.

    Separate source and target models, or one joint model over both sides when
    ``cfg.joint`` (needed to tie source and target embeddings).
    """
    src_lines, tgt_lines = _as_list(src_lines), _as_list(tgt_lines)
    key = cache_key(src_lines, tgt_lines, cfg)
    return train_or_load_pairs(lambda: zip(src_lines, tgt_lines, strict=True), key, cfg)


def train_or_load_pairs(
    read_pairs: Callable[[], Iterable[tuple[str, str]]], key: str, cfg: TokenizerConfig
) -> Tokenizer:
    """Tokenizer cached under ``key``, or trained on a reservoir sample of
    ``read_pairs()`` (called only on a cache miss) and then cached."""
    directory = Path(cfg.cache_dir).expanduser() / key
    tokenizer = _load_cached(directory)
    if tokenizer is None:
        size = MAX_TRAINING_LINES // 2 if cfg.joint else MAX_TRAINING_LINES
        src_lines, tgt_lines, seen = reservoir_sample(read_pairs(), size)
        if seen > size:
            logger.info("training SentencePiece on a sample of %d of %d pairs", size, seen)
        if cfg.joint:
            src_model = tgt_model = _train([*src_lines, *tgt_lines], cfg, "joint")
        else:
            src_model = _train(src_lines, cfg, "source")
            tgt_model = _train(tgt_lines, cfg, "target")
        del src_lines, tgt_lines
        files = {SRC_FILE: src_model, TGT_FILE: tgt_model}
        tokenizer = Tokenizer.from_serialized(files)
        _write_cache(directory, files)
        logger.info("trained tokenizer, cached in %s", directory)
    logger.info(
        "vocabulary sizes: source %d, target %d (requested %d%s)",
        tokenizer.src_vocab_size,
        tokenizer.tgt_vocab_size,
        cfg.vocab_size,
        ", joint" if tokenizer.joint else "",
    )
    return tokenizer
