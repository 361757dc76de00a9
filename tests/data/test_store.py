"""The on-disk token store: same pairs as encoding in memory, built once, rebuilt on change
or damage."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from seq2seq.config import DataConfig, DataFormat, SplitConfig, TokenizerConfig
from seq2seq.data import corpus, integrity
from seq2seq.data import store as tokdata
from seq2seq.data.batching import collate, encode_pairs
from seq2seq.data.builtin import generate_pairs
from seq2seq.data.corpus import CorpusError, PairSource, load_split
from seq2seq.data.store import Filters, TokenStore, TokenStoreError, open_or_build, prepare
from seq2seq.data.tokenizer import Tokenizer, train_or_load

FILTERS = Filters(max_length=12, max_ratio=2.0)


def write_corpus(directory: Path, pairs: list[tuple[str, str]], *, gz: bool = False) -> PairSource:
    """Two aligned files, with a few lines that the cleaning and filters must drop."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [*pairs[:5], ("", "leer"), (" padded ", "\tauch "), *pairs[5:]]
    paths = []
    for side, name in ((0, "train.en"), (1, "train.de")):
        data = "".join(pair[side] + "\n" for pair in lines).encode()
        path = directory / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        paths.append(path)
    return PairSource("test", files=(paths[0], paths[1]))


def expected_pairs(source: PairSource, tokenizer: Tokenizer) -> list:
    src, tgt = zip(*source.pairs(), strict=True)
    return encode_pairs(
        list(src), list(tgt), tokenizer, max_length=FILTERS.max_length, max_ratio=FILTERS.max_ratio
    )


def stored_pairs(store: TokenStore) -> list:
    return [
        (
            store.src.ids[store.src.offsets[i] : store.src.offsets[i + 1]].tolist(),
            store.tgt.ids[store.tgt.offsets[i] : store.tgt.offsets[i + 1]].tolist(),
        )
        for i in range(len(store))
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_store_holds_the_filtered_pairs_encoded_in_memory(
    tmp_path: Path, tokenizer: Tokenizer, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokdata, "CHUNK_LINES", 37)  # several chunks, out of step with filters
    source = write_corpus(tmp_path / "corpus", generate_pairs(300, seed=3), gz=True)
    store = open_or_build(
        source, tokenizer, directory=tmp_path / "cache", filters=FILTERS, workers=workers
    )
    expected = expected_pairs(source, tokenizer)
    assert 100 < len(expected) < 300  # the filters did drop pairs
    assert stored_pairs(store) == expected
    assert isinstance(store.src.ids, np.memmap) and store.src.ids.dtype == np.uint16
    assert store.src_lengths.tolist() == [len(s) for s, _ in expected]
    assert store.tgt_lengths.tolist() == [len(t) for _, t in expected]
    header = json.loads((store.path / tokdata.HEADER).read_text())
    assert (header["lines"], header["empty"], header["pairs"]) == (302, 1, len(expected))
    indices = np.array([5, 0, len(expected) - 1, 17])
    batch, want = store.batch(indices), collate([expected[i] for i in indices])
    for name in ("src", "src_lengths", "tgt_in", "tgt_out"):
        assert torch.equal(getattr(batch, name), getattr(want, name)), name


def test_workers_write_the_same_bytes(tmp_path: Path, tokenizer: Tokenizer) -> None:
    source = write_corpus(tmp_path / "corpus", generate_pairs(200, seed=4))
    one = open_or_build(source, tokenizer, directory=tmp_path / "a", filters=FILTERS, workers=1)
    two = open_or_build(source, tokenizer, directory=tmp_path / "b", filters=FILTERS, workers=2)
    assert one.path is not None and two.path is not None and one.path.name == two.path.name
    for name in ("src.ids", "tgt.ids", "src.off", "tgt.off", "src.len", "tgt.len"):
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name


def _no_encoding(*args: object) -> None:
    raise AssertionError("encoded again")


def test_cache_is_reused_and_rebuilt_when_corpus_tokenizer_or_filters_change(
    tmp_path: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = generate_pairs(120, seed=5)
    source = write_corpus(tmp_path / "corpus", pairs)
    first = open_or_build(source, tokenizer, directory=tmp_path / "cache", filters=FILTERS)
    with monkeypatch.context() as patch:
        patch.setattr(tokdata._Encoder, "__call__", _no_encoding)
        again = open_or_build(
            PairSource("test", files=source.files),
            tokenizer,
            directory=tmp_path / "cache",
            filters=FILTERS,
            workers=1,
        )
        assert again.path == first.path and stored_pairs(again) == stored_pairs(first)
        changed = write_corpus(tmp_path / "corpus", [pairs[1], pairs[0], *pairs[2:]])
        with pytest.raises(AssertionError, match="encoded again"):
            open_or_build(
                changed, tokenizer, directory=tmp_path / "cache", filters=FILTERS, workers=1
            )
        with pytest.raises(AssertionError, match="encoded again"):
            open_or_build(
                source, tokenizer, directory=tmp_path / "cache", filters=Filters(12, 3.0), workers=1
            )
    cfg = TokenizerConfig(vocab_size=90, cache_dir=str(tmp_path / "spm"))
    other = train_or_load([s for s, _ in pairs], [t for _, t in pairs], cfg)
    rebuilt = open_or_build(source, other, directory=tmp_path / "cache", filters=FILTERS)
    assert rebuilt.path != first.path and first.path.is_dir()
    assert stored_pairs(rebuilt) == expected_pairs(source, other)


def test_failed_build_leaves_no_store(
    tmp_path: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_corpus(tmp_path / "corpus", generate_pairs(100, seed=6))
    monkeypatch.setattr(tokdata, "CHUNK_LINES", 10)
    calls = []
    real = tokdata._Encoder.__call__

    def fail_late(self: tokdata._Encoder, chunk: object) -> object:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, chunk)  # type: ignore[arg-type]

    monkeypatch.setattr(tokdata._Encoder, "__call__", fail_late)
    with pytest.raises(KeyboardInterrupt):
        open_or_build(source, tokenizer, directory=tmp_path / "cache", filters=FILTERS, workers=1)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(tokdata._Encoder, "__call__", real)
    store = open_or_build(source, tokenizer, directory=tmp_path / "cache", filters=FILTERS)
    assert stored_pairs(store) == expected_pairs(source, tokenizer)


def _text_config(directory: Path, tmp_path: Path, **data: object) -> DataConfig:
    return DataConfig(
        format=DataFormat.text,
        train=SplitConfig(src=str(directory / "train.en"), tgt=str(directory / "train.de")),
        valid=SplitConfig(src=str(directory / "train.en"), tgt=str(directory / "train.de")),
        cache_dir=str(tmp_path / "tokens"),
        **data,  # type: ignore[arg-type]
    )


def test_second_run_reads_no_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_corpus(tmp_path / "corpus", generate_pairs(200, seed=8))
    data = _text_config(tmp_path / "corpus", tmp_path, num_workers=2)
    tok_cfg = TokenizerConfig(vocab_size=100, cache_dir=str(tmp_path / "spm"))
    prepared = prepare(data, tok_cfg)
    tokenizer, store = prepared.tokenizer, prepared.store
    loaded = load_split(data, "train")
    assert stored_pairs(store) == encode_pairs(
        loaded["src"], loaded["tgt"], tokenizer, max_length=100, max_ratio=3.0
    )

    def no_reading(*args: object) -> None:
        raise AssertionError("read the corpus again")

    monkeypatch.setattr(PairSource, "chunks", no_reading)
    again_prepared = prepare(data, tok_cfg)
    again_tokenizer, again = again_prepared.tokenizer, again_prepared.store
    assert again.path == store.path and again_tokenizer.serialize() == tokenizer.serialize()
    default = tokdata.cache_dir(DataConfig(), tok_cfg)
    assert default == tmp_path / "tokens"


def test_misaligned_corpus_stops_before_anything_is_cached(tmp_path: Path) -> None:
    directory = tmp_path / "corpus"
    write_corpus(directory, generate_pairs(50, seed=9))
    tgt = directory / "train.de"
    tgt.write_text("".join(tgt.read_text().splitlines(keepends=True)[:-2]))
    data = _text_config(directory, tmp_path)
    tok_cfg = TokenizerConfig(vocab_size=100, cache_dir=str(tmp_path / "spm"))
    with pytest.raises(CorpusError) as error:
        prepare(data, tok_cfg)
    assert str(error.value) == (
        f"misaligned corpus: {directory / 'train.en'} has 52 lines but {tgt} has 50"
    )
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "spm").exists()


def test_no_pairs_left_is_an_error(tmp_path: Path, tokenizer: Tokenizer) -> None:
    source = write_corpus(tmp_path / "corpus", generate_pairs(20, seed=2))
    with pytest.raises(CorpusError, match="no training pairs left after filtering"):
        open_or_build(source, tokenizer, directory=tmp_path / "cache", filters=Filters(1, 0.0))
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_worker_error_names_file_and_line(tmp_path: Path, tokenizer: Tokenizer) -> None:
    source = write_corpus(tmp_path / "corpus", generate_pairs(40, seed=1))
    assert source.files is not None
    src = source.files[0]
    lines = src.read_bytes().splitlines(keepends=True)
    src.write_bytes(b"".join([*lines[:30], b"caf\xe9\n", *lines[31:]]))
    with pytest.raises(CorpusError, match=r"train\.en:31: not valid UTF-8"):
        open_or_build(source, tokenizer, directory=tmp_path / "cache", filters=FILTERS, workers=2)
    assert list((tmp_path / "cache").iterdir()) == []


# ------------------------------------------------------------- damaged stores


def _truncate(path: Path, by: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - by)


def _overwrite(path: Path, dtype: type, at: int, value: int) -> None:
    """One element of an array file changed in place: the size stays the same."""
    array = np.fromfile(path, dtype=dtype)
    array[at] = value
    array.tofile(path)


def _edit_header(directory: Path) -> None:
    header = json.loads((directory / tokdata.HEADER).read_text())
    header["src_tokens"] //= 2
    header["src_dtype"] = "int32"  # the same bytes read as half as many ids
    (directory / tokdata.HEADER).write_text(json.dumps(header))


def _shuffle_ids(directory: Path) -> None:
    """Garbage of the same size and every id within the vocabulary."""
    ids = np.fromfile(directory / "tgt.ids", dtype=np.uint16)
    np.random.default_rng(0).permutation(ids).tofile(directory / "tgt.ids")


def _replace_by_file(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.write_text("not a store\n")


DAMAGES = {
    "src.ids cut to an odd size": lambda d: _truncate(d / "src.ids", 1),
    "src.ids cut to an even size": lambda d: _truncate(d / "src.ids", 4),
    "header.json not JSON": lambda d: (d / tokdata.HEADER).write_text('{"version": 2, "pa'),
    "header.json edited": _edit_header,
    "header.json missing": lambda d: (d / tokdata.HEADER).unlink(),
    "empty array file": lambda d: (d / "tgt.len").write_bytes(b""),
    "missing array file": lambda d: (d / "src.off").unlink(),
    "bad offsets": lambda d: _overwrite(d / "src.off", np.int64, 3, 10**9),
    "ids beyond the vocabulary": lambda d: _overwrite(d / "src.ids", np.uint16, 5, 65535),
    "in-vocabulary garbage": _shuffle_ids,
    "a file in its place": _replace_by_file,
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_store_is_named_and_rebuilt_in_its_place(
    tmp_path: Path, tokenizer: Tokenizer, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_corpus(tmp_path / "corpus", generate_pairs(150, seed=10))
    cache = tmp_path / "cache"
    built = open_or_build(source, tokenizer, directory=cache, filters=FILTERS, workers=1)
    expected, path = stored_pairs(built), built.path
    assert path is not None
    del built
    damage(path)  # type: ignore[operator]
    with pytest.raises(TokenStoreError, match=re.escape(str(path))):
        TokenStore.open(path)
    with caplog.at_level(logging.WARNING, logger="seq2seq.data"):
        again = open_or_build(source, tokenizer, directory=cache, filters=FILTERS, workers=1)
    assert again.path == path and stored_pairs(again) == expected
    assert f"rebuilding the token store {path}" in caplog.text
    assert [p.name for p in cache.iterdir()] == [path.name]  # nothing left beside it
    assert stored_pairs(TokenStore.open(path)) == expected


def test_a_store_that_fails_its_check_when_built_is_an_error_naming_it(
    tmp_path: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that does not return what was written: one error, not a loop of rebuilds."""
    source = write_corpus(tmp_path / "corpus", generate_pairs(60, seed=11))
    cache = tmp_path / "cache"
    calls = iter(range(10**6))
    monkeypatch.setattr(integrity, "file_digest", lambda path: f"{next(calls):032x}")
    with pytest.raises(TokenStoreError, match=re.escape(str(cache)) + ".*digest differs"):
        open_or_build(source, tokenizer, directory=cache, filters=FILTERS, workers=1)


def test_an_edit_in_the_middle_under_the_old_times_is_not_served_from_the_cache(
    tmp_path: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, mtime restored (``touch -r``), change far from both sampled ends."""
    monkeypatch.setattr(corpus, "SAMPLE_BYTES", 1 << 10)
    source = write_corpus(tmp_path / "corpus", generate_pairs(400, seed=12))
    assert source.files is not None
    src = source.files[0]
    assert src.stat().st_size > 4 * corpus.SAMPLE_BYTES
    cache = tmp_path / "cache"
    first = open_or_build(source, tokenizer, directory=cache, filters=FILTERS, workers=1)
    before = src.stat()
    lines = src.read_bytes().splitlines(keepends=True)
    middle = len(lines) // 2
    lines[middle], lines[middle + 1] = lines[middle + 1], lines[middle]
    with src.open("r+b") as handle:  # in place: the same inode
        handle.write(b"".join(lines))
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    edited = PairSource("test", files=source.files)
    again = open_or_build(edited, tokenizer, directory=cache, filters=FILTERS, workers=1)
    assert again.path != first.path
    assert again.corpus_digest != first.corpus_digest
    assert stored_pairs(again) == expected_pairs(edited, tokenizer) != stored_pairs(first)
