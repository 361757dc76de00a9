"""Every corpus format streams the same pairs into the same token store as two text files."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seq2seq.config import DataConfig, DataFormat, SplitConfig, TokenizerConfig
from seq2seq.data.builtin import generate_pairs
from seq2seq.data.corpus import CorpusError, PairSource, load_split, train_source
from seq2seq.data.store import Filters, open_or_build, prepare
from seq2seq.data.tokenizer import Tokenizer

ARRAYS = ("src.ids", "tgt.ids", "src.off", "tgt.off", "src.len", "tgt.len")
FILTERS = Filters(max_length=12, max_ratio=2.0)


def corpus_pairs(n: int = 150) -> list[tuple[str, str]]:
    """Generated pairs with an empty and a padded one, which the cleaning must handle."""
    pairs = generate_pairs(n, seed=11)
    return [*pairs[:4], ("", "leer"), (" padded ", "  auch "), *pairs[4:]]


@pytest.fixture(autouse=True)
def _local_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets`` writes its Arrow copies under the test's directory, offline."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


Pairs = list[tuple[str, str]]


def _columns(pairs: Pairs) -> dict[str, list[str]]:
    return {"src": [s for s, _ in pairs], "tgt": [t for _, t in pairs]}


def _translation(pairs: Pairs) -> list[dict[str, str]]:
    """A ``translation`` column, with a third language that must be ignored."""
    return [{"en": s, "de": t, "fr": "x"} for s, t in pairs]


def _tsv(path: Path, pairs: Pairs) -> None:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs))


def _jsonl(path: Path, pairs: Pairs) -> None:
    """Both record shapes, alternating."""
    records = [
        {"src": s, "tgt": t} if i % 2 else {"translation": _translation([(s, t)])[0]}
        for i, (s, t) in enumerate(pairs)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _parquet(path: Path, pairs: Pairs) -> None:
    pq.write_table(pa.table(_columns(pairs)), path, row_group_size=40)


def _parquet_dir(path: Path, pairs: Pairs) -> None:
    """One column per language, in two files."""
    path.mkdir()
    half = len(pairs) // 2
    for name, part in (("a", pairs[:half]), ("b", pairs[half:])):
        columns = _columns(part)
        pq.write_table(
            pa.table({"en": columns["src"], "de": columns["tgt"]}), path / f"{name}.parquet"
        )


def _arrow(path: Path, pairs: Pairs, *, stream: bool = False) -> None:
    """An Arrow IPC file (or stream, as ``datasets`` writes) of several record batches."""
    schema = pa.schema([("src", pa.string()), ("tgt", pa.string())])
    new = pa.ipc.new_stream if stream else pa.ipc.new_file
    with new(path, schema) as writer:
        for first in range(0, len(pairs), 33):
            writer.write_table(pa.table(_columns(pairs[first : first + 33]), schema=schema))


def _arrow_disk(path: Path, pairs: Pairs) -> None:
    """A ``save_to_disk`` DatasetDict with a translation column."""
    train = datasets.Dataset.from_dict({"translation": _translation(pairs)})
    datasets.DatasetDict({"train": train}).save_to_disk(str(path))


WRITERS = {
    "tsv": _tsv,
    "jsonl": _jsonl,
    "parquet": _parquet,
    "parquet-dir": _parquet_dir,
    "arrow": _arrow,
    "arrow-stream": functools.partial(_arrow, stream=True),
    "arrow-disk": _arrow_disk,
}


def write_format(name: str, directory: Path, pairs: Pairs) -> DataConfig:
    """``pairs`` written in format ``name`` under ``directory``; the config that reads it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train"
    if name == "text":
        columns = _columns(pairs)
        for lang, side in (("en", columns["src"]), ("de", columns["tgt"])):
            (directory / f"train.{lang}").write_text("".join(f"{line}\n" for line in side))
        split = SplitConfig(src=str(directory / "train.en"), tgt=str(directory / "train.de"))
        return DataConfig(format=DataFormat.text, train=split)
    if name.startswith("hub"):  # a local folder, read by datasets.load_dataset as a hub name is
        path.mkdir()
        table = pa.table({"translation": _translation(pairs)})
        pq.write_table(table, path / "train-00000-of-00001.parquet")
        return DataConfig(
            format=DataFormat.hub,
            name=str(path),
            train=SplitConfig(split="train"),
            hub_streaming=name == "hub-stream",
        )
    WRITERS[name](path, pairs)
    form = DataFormat(name.split("-")[0])
    return DataConfig(format=form, train=SplitConfig(path=str(path), split="train"))


FORMATS = [*WRITERS, "hub", "hub-stream"]


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_gives_the_pairs_and_store_of_the_text_path(
    tmp_path: Path, tokenizer: Tokenizer, name: str
) -> None:
    pairs = corpus_pairs()
    text = train_source(write_format("text", tmp_path / "text", pairs))
    other = train_source(write_format(name, tmp_path / name, pairs))
    assert list(other.pairs()) == list(text.pairs())
    assert len(list(text.pairs())) == len(pairs) - 1  # the empty pair is dropped
    stores = [
        open_or_build(source, tokenizer, directory=tmp_path / "cache", filters=FILTERS, workers=2)
        for source in (text, other)
    ]
    assert stores[0].path != stores[1].path  # two corpora, two stores
    for array in ARRAYS:
        assert (stores[0].path / array).read_bytes() == (stores[1].path / array).read_bytes()


def test_the_small_splits_read_every_format_the_same_way(tmp_path: Path) -> None:
    pairs = corpus_pairs(30)
    want = load_split(write_format("text", tmp_path / "text", pairs), "train")
    for name in ("jsonl", "parquet-dir", "arrow-disk", "hub"):
        got = load_split(write_format(name, tmp_path / name, pairs), "train")
        assert got["src"] == want["src"] and got["tgt"] == want["tgt"], name


def _text_with_bad_rows(tmp_path: Path) -> tuple[DataConfig, list[str]]:
    """A TSV file with five malformed rows among good ones; their expected names."""
    good = [f"{s}\t{t}" for s, t in generate_pairs(60, seed=3)]
    bad_at = {7: "a\tb\tc", 20: "no tab", 21: "", 33: "x\ty\tz\tw", 50: "caf\xe9"}
    lines = [line.encode() for line in good]
    for number, text in sorted(bad_at.items()):
        raw = text.encode("latin-1") if "\xe9" in text else text.encode()
        lines.insert(number - 1, raw)
    path = tmp_path / "train.tsv"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    names = [
        f"{path}:7: expected 'source<TAB>target' (exactly one tab), found 2 tabs",
        f"{path}:20: expected 'source<TAB>target' (exactly one tab), found 0 tabs",
        f"{path}:33: expected 'source<TAB>target' (exactly one tab), found 3 tabs",
    ]
    return DataConfig(format=DataFormat.tsv, train=SplitConfig(path=str(path))), names


def test_a_bad_row_stops_the_run_naming_file_and_row(tmp_path: Path) -> None:
    cfg, names = _text_with_bad_rows(tmp_path)
    with pytest.raises(CorpusError) as error:
        list(train_source(cfg).pairs())
    assert str(error.value) == f"{names[0]}; fix the file or set data.skip_bad_rows=true"
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"src": ["a", "b", None], "tgt": ["x", "y", "z"]}), table)
    cfg = DataConfig(format=DataFormat.parquet, train=SplitConfig(path=str(table)))
    with pytest.raises(CorpusError, match=r"t\.parquet: row 3: a side is missing"):
        list(train_source(cfg).pairs())
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"src": "a", "tgt": "b"}\n{"src": "a"}\n')
    cfg = DataConfig(format=DataFormat.jsonl, train=SplitConfig(path=str(jsonl)))
    with pytest.raises(CorpusError, match=r"t\.jsonl:2: expected"):
        list(train_source(cfg).pairs())


def test_skip_bad_rows_counts_them_exactly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, names = _text_with_bad_rows(tmp_path)
    cfg.skip_bad_rows = True
    cfg.cache_dir = str(tmp_path / "tokens")
    tok_cfg = TokenizerConfig(vocab_size=90, cache_dir=str(tmp_path / "spm"))
    with caplog.at_level(logging.WARNING, logger="seq2seq.data.corpus"):
        prepared = prepare(cfg, tok_cfg)
    counts = prepared.store.counts
    assert (counts["lines"], counts["bad_rows"], counts["empty"]) == (65, 4, 1)
    assert counts["bad_examples"] == names
    assert f"train split: skipped 4 bad rows (data.skip_bad_rows=true); first: {names[0]}" in (
        caplog.text
    )
    assert len(list(train_source(cfg).pairs())) == 60
    assert prepare(cfg, tok_cfg).store.counts == counts  # a cached run reports the same
    valid = load_split(cfg, "train")
    assert len(valid) == 60
    table = tmp_path / "t.parquet"
    rows = {"src": ["a", None, "b", "c", None], "tgt": ["x", "y", None, "z", None]}
    pq.write_table(pa.table(rows), table)
    cfg = DataConfig(
        format=DataFormat.parquet, train=SplitConfig(path=str(table)), skip_bad_rows=True
    )
    chunks = list(train_source(cfg).chunks(2))
    assert sum(chunk.bad for chunk in chunks) == 3
    assert list(train_source(cfg).pairs()) == [("a", "x"), ("c", "z")]


def test_a_pair_bad_on_both_sides_is_one_bad_row(tmp_path: Path) -> None:
    src = [b"a", b"caf\xe9", b"c", b"\xff", b"e"]
    tgt = [b"v", b"w", b"x", b"\xfe", b"z"]
    for name, lines in (("train.en", src), ("train.de", tgt)):
        (tmp_path / name).write_bytes(b"".join(line + b"\n" for line in lines))
    split = SplitConfig(src=str(tmp_path / "train.en"), tgt=str(tmp_path / "train.de"))
    cfg = DataConfig(format=DataFormat.text, train=split, skip_bad_rows=True)
    (chunk,) = train_source(cfg).chunks(10)
    assert (chunk.src, chunk.tgt, chunk.rows, chunk.bad) == (["a", "c", "e"], ["v", "x", "z"], 5, 2)
    assert [name.split(": ")[0] for name in chunk.bad_names] == [
        f"{tmp_path / 'train.en'}:2",
        f"{tmp_path / 'train.en'}:4",
    ]


def _bytes_read() -> int:
    """Bytes this process has read through system calls so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _distinct_pairs(n: int) -> list[tuple[str, str]]:
    """``n`` pairs that no table compresses to a dictionary of a few rows."""
    base = generate_pairs(2000, seed=11)
    return [(f"{s} {i}", f"{t} {i}") for i, (s, t) in enumerate(base * (n // len(base)))]


def _cached_run_reads(cfg: DataConfig, tok_cfg: TokenizerConfig, tokenizer: Tokenizer) -> int:
    """Bytes a cached ``prepare`` reads beyond the token store, which it verifies whole."""
    before = _bytes_read()
    again = prepare(cfg, tok_cfg, tokenizer=tokenizer)
    read = _bytes_read() - before
    return read - sum(path.stat().st_size for path in again.store.path.iterdir())


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
@pytest.mark.parametrize("name", ["text", "tsv", "jsonl", "parquet", "arrow", "arrow-disk", "hub"])
def test_a_cached_run_reads_no_more_of_a_bigger_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer, name: str
) -> None:
    """A second run recognises its corpus by a fingerprint: what it reads is the same
    for a corpus four times the size, so it never reads a file source whole."""
    tok_cfg = TokenizerConfig(vocab_size=90, cache_dir=str(tmp_path / "spm"))
    configs = []
    for size in (8_000, 32_000):
        cfg = write_format(name, tmp_path / f"{name}-{size}", _distinct_pairs(size))
        cfg.cache_dir = str(tmp_path / "tokens")
        prepare(cfg, tok_cfg, tokenizer=tokenizer)
        configs.append(cfg)
    sizes = [sum(path.stat().st_size for path in train_source(c).paths) for c in configs]

    def no_reading(*args: object) -> None:
        raise AssertionError("read the corpus again")

    monkeypatch.setattr(PairSource, "chunks", no_reading)
    small, big = (_cached_run_reads(cfg, tok_cfg, tokenizer) for cfg in configs)
    assert sizes[1] - sizes[0] > 750_000 or name == "hub"
    assert big - small < 16_384, f"read {big - small} more bytes of a bigger corpus"
