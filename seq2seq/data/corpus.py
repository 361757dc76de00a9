"""Read parallel corpora into ``datasets.Dataset`` objects with columns "src" and "tgt".

Why one module: every source of sentence pairs (the built-in generator, two
aligned text files, TSV, JSONL, the Hugging Face hub) ends up in the same two
columns, after the same checks. The checks matter more than the reading: two
text files that differ by one line silently shift every later pair out of
alignment, so line counts are compared before anything else, and errors name
the files, line numbers and counts.

Where a split comes from, in order of precedence:

1. the format's own keys: ``src``/``tgt`` (``text``) or ``path`` (``tsv``, ``jsonl``);
2. ``data.dir`` with the split's ``stem``: ``{dir}/{stem}.{src_lang}`` and
   ``{dir}/{stem}.{tgt_lang}`` (``.gz`` accepted), whatever the format, so a hub
   corpus such as Multi30k can be read from a local copy;
3. the hub split name (``hub``) or the generator (``builtin``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Literal, TextIO

import datasets

from seq2seq.config import BuiltinConfig, DataConfig, SplitConfig
from seq2seq.data import builtin
from seq2seq.data.digest import file_digest, text_digest

logger = logging.getLogger(__name__)

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
FORMATS = ("builtin", "text", "tsv", "jsonl", "hub")


class CorpusError(ValueError):
    """A corpus cannot be read: missing or misaligned files, malformed lines, no config."""


class _MissingDirFile(CorpusError):
    """A ``{dir}/{stem}.{lang}`` file is absent: lets ``load_corpus`` skip a test split."""


def open_text(path: str | Path, errors: str = "strict") -> TextIO:
    """Open a UTF-8 text file for reading, gunzipping ``*.gz`` transparently.

    Lines end at "\\n" only (``newline="\\n"``), so a stray "\\r" or U+2028 inside a
    sentence cannot split it in two and break the one-line-per-sentence contract.
    A leading byte-order mark is dropped. Raises ``FileNotFoundError`` like ``open``.
    """
    path = Path(path).expanduser()
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors=errors, newline="\n")
    return path.open(encoding="utf-8-sig", errors=errors, newline="\n")


def read_lines(path: str | Path) -> list[str]:
    """All lines of a UTF-8 text file (``.gz`` ok), without the trailing "\\n" or "\\r\\n".

    Decodes line by line (not via ``open_text``) so an encoding error names its line.
    """
    path = Path(path).expanduser()
    lines: list[str] = []
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
            for raw in handle:
                lines.append(raw.decode("utf-8").removesuffix("\n").removesuffix("\r"))
    except FileNotFoundError as e:
        raise CorpusError(f"corpus file not found: {path}") from e
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}:{len(lines) + 1}: not valid UTF-8 ({e.reason})") from e
    except (OSError, EOFError) as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")
    return lines


# ------------------------------------------------------------------------ readers


def _resolve_in_dir(directory: str, stem: str, lang: str) -> Path:
    """``{dir}/{stem}.{lang}``, or the same with ``.gz`` when only that exists."""
    plain = Path(directory).expanduser() / f"{stem}.{lang}"
    gz = plain.with_name(plain.name + ".gz")
    if not plain.exists() and gz.exists():
        return gz
    if not plain.exists():
        raise _MissingDirFile(f"corpus file not found: {plain} (nor {gz.name})")
    return plain


def _read_text_pair(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    """Two aligned files; different line counts are an error before anything else."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise CorpusError(
            f"misaligned corpus: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}"
        )
    return src, tgt


def _read_tsv(path: str | Path) -> tuple[list[str], list[str]]:
    """One "source<TAB>target" pair per line; blank lines count as empty pairs."""
    src: list[str] = []
    tgt: list[str] = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            src.append("")
            tgt.append("")
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise CorpusError(
                f"{path}:{number}: expected 'source<TAB>target' (exactly one tab), "
                f"found {len(fields) - 1} tabs"
            )
        src.append(fields[0])
        tgt.append(fields[1])
    return src, tgt


def _jsonl_pair(record: object, src_lang: str, tgt_lang: str) -> tuple[str, str] | None:
    """The (src, tgt) strings of one JSONL record, or None when it has neither shape."""
    if not isinstance(record, dict):
        return None
    if "src" in record and "tgt" in record:
        pair = (record["src"], record["tgt"])
    elif isinstance(record.get("translation"), dict):
        translation = record["translation"]
        pair = (translation.get(src_lang), translation.get(tgt_lang))
    else:
        return None
    if not all(isinstance(side, str) for side in pair):
        return None
    return pair


def _read_jsonl(path: str | Path, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """One JSON object per line: {"src", "tgt"} or {"translation": {src_lang, tgt_lang}}."""
    src: list[str] = []
    tgt: list[str] = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            src.append("")
            tgt.append("")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{number}: invalid JSON ({e.msg})") from e
        pair = _jsonl_pair(record, src_lang, tgt_lang)
        if pair is None:
            raise CorpusError(
                f'{path}:{number}: expected {{"src": str, "tgt": str}} or '
                f'{{"translation": {{"{src_lang}": str, "{tgt_lang}": str}}}}'
            )
        src.append(pair[0])
        tgt.append(pair[1])
    return src, tgt


def _read_hub(cfg: DataConfig, hub_split: str) -> tuple[list[str], list[str]]:
    """A split from the Hugging Face hub (``data.hub_name``, else ``data.name``): a
    "translation" column or one column per language (e.g. bentrevett/multi30k: "en", "de")."""
    name = cfg.hub_name or cfg.name
    try:
        dataset = datasets.load_dataset(name, cfg.hub_config, split=hub_split)
    except Exception as e:  # network, missing dataset, unknown split: all mean the same here
        raise CorpusError(
            f"could not load dataset {name!r} (config {cfg.hub_config!r}, split "
            f"{hub_split!r}) from the Hugging Face hub: {e}. Without network, point "
            f"data.dir= at local files {{stem}}.{cfg.src_lang}/{{stem}}.{cfg.tgt_lang}[.gz] "
            f"or use data.format=text/tsv/jsonl"
        ) from e
    columns = dataset.column_names
    if "translation" in columns:
        rows = dataset["translation"]
        try:
            return [row[cfg.src_lang] for row in rows], [row[cfg.tgt_lang] for row in rows]
        except KeyError as e:
            raise CorpusError(
                f"dataset {name!r}: 'translation' has no language {e.args[0]!r} "
                f"(keys: {sorted(rows[0]) if len(rows) else []})"
            ) from e
    if cfg.src_lang in columns and cfg.tgt_lang in columns:
        return list(dataset[cfg.src_lang]), list(dataset[cfg.tgt_lang])
    raise CorpusError(
        f"dataset {name!r} split {hub_split!r} has columns {columns}; expected "
        f"'translation' or {cfg.src_lang!r} and {cfg.tgt_lang!r} (data.src_lang/data.tgt_lang)"
    )


@functools.lru_cache(maxsize=2)
def _builtin_splits(
    settings: tuple[int, ...], src_lang: str, tgt_lang: str
) -> dict[str, list[tuple[str, str]]]:
    """Generated once per settings, so loading three splits does not generate three times.

    ``settings`` is ``dataclasses.astuple(BuiltinConfig)``: the dataclass is not hashable.
    """
    cfg = BuiltinConfig(*settings)
    return builtin.make_splits(cfg, src_lang=src_lang, tgt_lang=tgt_lang)


def _builtin_split(cfg: DataConfig, split: Split) -> tuple[list[str], list[str]]:
    settings = dataclasses.astuple(cfg.builtin)
    try:
        pairs = _builtin_splits(settings, cfg.src_lang, cfg.tgt_lang)[split]
    except ValueError as e:
        raise CorpusError(str(e)) from e
    return [s for s, _ in pairs], [t for _, t in pairs]


def _not_configured(cfg: DataConfig, split: Split) -> CorpusError:
    keys = {
        "text": f"data.{split}.src and data.{split}.tgt",
        "tsv": f"data.{split}.path",
        "jsonl": f"data.{split}.path",
        "hub": f"data.{split}.split",
        "builtin": "nothing (always configured)",
    }[str(cfg.format)]
    return CorpusError(
        f"no {split} split configured for data.format={cfg.format}: set {keys}, "
        f"or data.dir with data.{split}.stem"
    )


def _source(cfg: DataConfig, split: Split) -> tuple[list[str], list[str]] | None:
    """Read the raw sides of one split, or None when the split is not configured."""
    split_cfg: SplitConfig = getattr(cfg, split)
    if cfg.format == "text" and (split_cfg.src or split_cfg.tgt):
        if not (split_cfg.src and split_cfg.tgt):
            raise CorpusError(f"data.{split}: set both src and tgt (got {split_cfg})")
        return _read_text_pair(split_cfg.src, split_cfg.tgt)
    if cfg.format in ("tsv", "jsonl") and split_cfg.path:
        if cfg.format == "tsv":
            return _read_tsv(split_cfg.path)
        return _read_jsonl(split_cfg.path, cfg.src_lang, cfg.tgt_lang)
    if cfg.dir and split_cfg.stem:
        return _read_text_pair(
            _resolve_in_dir(cfg.dir, split_cfg.stem, cfg.src_lang),
            _resolve_in_dir(cfg.dir, split_cfg.stem, cfg.tgt_lang),
        )
    if cfg.format == "hub" and split_cfg.split:
        return _read_hub(cfg, split_cfg.split)
    if cfg.format == "builtin":
        return _builtin_split(cfg, split)
    return None


def _to_dataset(src: Sequence[str], tgt: Sequence[str], split: str) -> datasets.Dataset:
    """Strip each sentence, drop pairs with an empty side, log how many were dropped."""
    kept_src: list[str] = []
    kept_tgt: list[str] = []
    for s, t in zip(src, tgt, strict=True):
        s, t = s.strip(), t.strip()
        if s and t:
            kept_src.append(s)
            kept_tgt.append(t)
    dropped = len(src) - len(kept_src)
    if dropped:
        logger.warning(
            "%s split: dropped %d of %d pairs with an empty side", split, dropped, len(src)
        )
    return datasets.Dataset.from_dict({"src": kept_src, "tgt": kept_tgt})


def _load(cfg: DataConfig, split: Split) -> datasets.Dataset | None:
    """One split, or None when it is not configured."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if str(cfg.format) not in FORMATS:
        raise CorpusError(f"unknown data.format={cfg.format!s}; valid: {', '.join(FORMATS)}")
    sides = _source(cfg, split)
    if sides is None:
        return None
    dataset = _to_dataset(*sides, split=split)
    if len(dataset) == 0:
        raise CorpusError(f"{split} split of {cfg.name!r} has no non-empty pairs")
    logger.info("%s split: %d pairs (%s)", split, len(dataset), cfg.name)
    return dataset


# ------------------------------------------------------------------------- public


def load_split(cfg: DataConfig, split: Split) -> datasets.Dataset:
    """One split as a Dataset with columns "src" and "tgt" (stripped, no empty sides)."""
    dataset = _load(cfg, split)
    if dataset is None:
        raise _not_configured(cfg, split)
    return dataset


def load_corpus(cfg: DataConfig) -> datasets.DatasetDict:
    """Train, valid and (when configured) test splits.

    The test split is optional: it is skipped when not configured, or when
    ``data.dir`` has no file for its stem (the default stem "test" may simply not exist).
    """
    splits: dict[str, datasets.Dataset] = {}
    for split in SPLITS:
        try:
            dataset = _load(cfg, split)
        except _MissingDirFile as e:
            if split != "test":
                raise
            logger.warning("skipping the test split: %s", e)
            continue
        if dataset is None and split == "test":
            logger.info("no test split configured for data.format=%s; skipping it", cfg.format)
            continue
        if dataset is None:
            raise _not_configured(cfg, split)
        splits[split] = dataset
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------- streaming

Line = str | bytes
SAMPLE_BYTES = 1 << 16  # read from each end of a file for its fingerprint
SETTLE_NS = 20_000_000  # longer than a kernel clock tick, which file times advance by


@dataclasses.dataclass(frozen=True)
class RawChunk:
    """Consecutive lines of both sides, as read: bytes from files, str from a dataset.

    ``first`` is the 0-based line number of the chunk's first line, so errors can
    name their line and the byte-order mark is dropped from line 0 only.
    """

    first: int
    src: Sequence[Line]
    tgt: Sequence[Line]


def _open_binary(path: Path) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")  # type: ignore[return-value]
    except FileNotFoundError as e:
        raise CorpusError(f"corpus file not found: {path}") from e
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e


def _count_rest(handle: BinaryIO, path: Path) -> int:
    try:
        return sum(1 for _ in handle)
    except (OSError, EOFError) as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e


def _read_chunk(handle: BinaryIO, path: Path, size: int) -> list[bytes]:
    try:
        return list(itertools.islice(handle, size))
    except (OSError, EOFError) as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e


def _file_chunks(src_path: Path, tgt_path: Path, size: int) -> Iterator[RawChunk]:
    """Read two aligned files side by side, ``size`` lines at a time.

    Why no count first: every pass reads both files to the end anyway, and the
    first pass (tokenizer sample or token store) comes before training, so a
    misaligned pair still stops the run before its first step, naming both counts.
    """
    with _open_binary(src_path) as src, _open_binary(tgt_path) as tgt:
        first = 0
        while True:
            src_lines = _read_chunk(src, src_path, size)
            tgt_lines = _read_chunk(tgt, tgt_path, size)
            if len(src_lines) != len(tgt_lines):
                n_src = first + len(src_lines) + _count_rest(src, src_path)
                n_tgt = first + len(tgt_lines) + _count_rest(tgt, tgt_path)
                raise CorpusError(
                    f"misaligned corpus: {src_path} has {n_src} lines but {tgt_path} has {n_tgt}"
                )
            if not src_lines:
                return
            yield RawChunk(first, src_lines, tgt_lines)
            first += len(src_lines)


def _decode(lines: Sequence[Line], path: Path | None, first: int) -> list[str]:
    """Stripped text of consecutive lines; bytes are decoded as one block, which is
    several times faster than line by line, and only a failure is looked at per line."""
    if not lines or isinstance(lines[0], str):
        return [str(line).strip() for line in lines]
    raw: Sequence[bytes] = lines  # type: ignore[assignment]
    try:
        text = b"".join(raw).decode("utf-8")
    except UnicodeDecodeError:
        for number, line in enumerate(raw, start=first + 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{number}: not valid UTF-8 ({e.reason})") from e
        raise
    parts = text.split("\n")[: len(raw)]  # every line but the file's last ends with "\n"
    if first == 0:
        parts[0] = parts[0].removeprefix("\ufeff")
    return [part.strip() for part in parts]


def clean_chunk(chunk: RawChunk, names: tuple[Path, Path] | None) -> tuple[list[str], list[str]]:
    """Decoded, stripped sentences of a chunk, without the pairs that have an empty side.

    The same cleaning as ``load_split`` applies to small corpora; ``names`` are the
    files the chunk came from, for error messages.
    """
    src_name, tgt_name = names or (None, None)
    src = _decode(chunk.src, src_name, chunk.first)
    tgt = _decode(chunk.tgt, tgt_name, chunk.first)
    if all(src) and all(tgt):
        return src, tgt
    kept = [i for i, (s, t) in enumerate(zip(src, tgt, strict=True)) if s and t]
    return [src[i] for i in kept], [tgt[i] for i in kept]


def _settled_stat(path: Path) -> os.stat_result:
    """``path.stat()`` taken a clock tick after the file's last change.

    Why wait: file times advance in ticks, so a write in the same tick as the
    change seen here would leave every time unchanged. Only a file changed in
    the last moment waits, and for at most one tick.
    """
    stat = path.stat()
    wait = stat.st_ctime_ns + SETTLE_NS - time.time_ns()
    if wait > 0:
        time.sleep(min(wait, SETTLE_NS) / 1e9)
        stat = path.stat()
    return stat


def _file_fingerprint(path: Path) -> str:
    """Path, size, times, inode and the first and last bytes of a file.

    Why not a hash of the content: a second run must start without reading a
    corpus of millions of lines again. Size and mtime catch an ordinary edit;
    the change time and inode catch an edit or a replacement that restored the
    old mtime (``touch -r``, ``cp -p``, ``mv``), which the sampled bytes may miss
    when the change is in the middle. The content itself is hashed once, when a
    token store is built from it (``PairSource.content_digest``).
    """
    try:
        stat = _settled_stat(path)
        with path.open("rb") as handle:
            head = handle.read(SAMPLE_BYTES)
            handle.seek(max(0, stat.st_size - SAMPLE_BYTES))
            tail = handle.read(SAMPLE_BYTES)
    except FileNotFoundError as e:
        raise CorpusError(f"corpus file not found: {path}") from e
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e
    identity = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    digest = hashlib.sha256(f"{path.resolve()}\0{identity}\0".encode())
    digest.update(head)
    digest.update(tail)
    return digest.hexdigest()


def _files_digest(paths: tuple[Path, Path]) -> str:
    """Digest of the bytes of both files, as stored (compressed for ``.gz``)."""
    try:
        return text_digest("files", *(file_digest(path) for path in paths))
    except FileNotFoundError as e:
        raise CorpusError(f"corpus file not found: {e.filename}") from e
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {e.filename}: {e.strerror or e}") from e


def _content_fingerprint(src: Sequence[str], tgt: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for side in (src, tgt):
        digest.update(f"\0side {len(side)}\0".encode())
        for line in side:
            digest.update(line.encode("utf-8", "surrogatepass"))
            digest.update(b"\0")
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class PairSource:
    """The training split, re-readable chunk by chunk without holding it in memory.

    Two aligned text files (``.gz`` too) are read lazily on every pass; the other
    formats (generator, TSV, JSONL, hub) come as an in-memory ``datasets.Dataset``
    already cleaned by ``load_split``.
    """

    name: str
    files: tuple[Path, Path] | None = None
    dataset: datasets.Dataset | None = None

    def chunks(self, size: int) -> Iterator[RawChunk]:
        """Consecutive raw lines of both sides; clean them with ``clean_chunk``."""
        if self.files is not None:
            yield from _file_chunks(*self.files, size)
            return
        assert self.dataset is not None
        for first in range(0, len(self.dataset), size):
            rows = self.dataset[first : first + size]
            yield RawChunk(first, rows["src"], rows["tgt"])

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Cleaned, non-empty (source, target) pairs in corpus order."""
        for chunk in self.chunks(10_000):
            yield from zip(*clean_chunk(chunk, self.files), strict=True)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the corpus for caches: file identity for files, content otherwise."""
        if self.files is not None:
            src, tgt = (_file_fingerprint(path) for path in self.files)
            return hashlib.sha256(f"files\0{src}\0{tgt}".encode()).hexdigest()
        assert self.dataset is not None
        return _content_fingerprint(self.dataset["src"], self.dataset["tgt"])

    @functools.cached_property
    def content_digest(self) -> str:
        """Identifies the lines themselves, whatever the files' names and times:
        reads both files whole (at memory speed), so only a build asks for it."""
        if self.files is not None:
            return _files_digest(self.files)
        return self.fingerprint


def train_source(cfg: DataConfig) -> PairSource:
    """The training split as a ``PairSource``, with the precedence of ``load_split``:
    aligned files are streamed, every other format is loaded (it is small, or cached
    by ``datasets`` already)."""
    if str(cfg.format) not in FORMATS:
        raise CorpusError(f"unknown data.format={cfg.format!s}; valid: {', '.join(FORMATS)}")
    split_cfg = cfg.train
    if cfg.format == "text" and (split_cfg.src or split_cfg.tgt):
        if not (split_cfg.src and split_cfg.tgt):
            raise CorpusError(f"data.train: set both src and tgt (got {split_cfg})")
        files = (Path(split_cfg.src).expanduser(), Path(split_cfg.tgt).expanduser())
        return PairSource(cfg.name, files=files)
    in_memory = cfg.format in ("tsv", "jsonl") and split_cfg.path
    if not in_memory and cfg.dir and split_cfg.stem:
        files = (
            _resolve_in_dir(cfg.dir, split_cfg.stem, cfg.src_lang),
            _resolve_in_dir(cfg.dir, split_cfg.stem, cfg.tgt_lang),
        )
        return PairSource(cfg.name, files=files)
    return PairSource(cfg.name, dataset=load_split(cfg, "train"))
