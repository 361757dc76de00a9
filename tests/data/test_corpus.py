"""Reading parallel corpora: every format, alignment checks, errors that name files."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import datasets
import pytest

from seq2seq.config import BuiltinConfig, DataConfig, DataFormat, SplitConfig
from seq2seq.data import corpus
from seq2seq.data.chunks import clean
from seq2seq.data.corpus import CorpusError, load_corpus, load_split, train_source
from seq2seq.data.text import TextError, iter_lines, read_lines
from tests.helpers import MULTI30K


def write(path: Path, lines: list[str], *, gz: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def pairs(dataset: datasets.Dataset) -> list[tuple[str, str]]:
    return list(zip(dataset["src"], dataset["tgt"], strict=True))


def test_read_lines_plain_gz_bom_newline_only_and_nul(tmp_path: Path) -> None:
    plain = tmp_path / "a.txt"
    plain.write_bytes("\ufeffeins\r\nzwei\u2028drei\rvier\n\n \0 \nfünf".encode())
    assert read_lines(plain) == ["eins\r", "zwei\u2028drei\rvier", "", "", "fünf"]
    gz = write(tmp_path / "b.txt.gz", ["Grüße", "x"], gz=True)
    assert read_lines(gz) == ["Grüße", "x"]
    assert list(iter_lines(gz)) == ["Grüße", "x"]


def test_read_lines_errors_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(TextError, match=r"file not found: .*nope\.txt"):
        read_lines(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match=r"corpus file not found"):
        read_lines(tmp_path / "nope.txt", what="corpus file", error=CorpusError)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n" * 20_001 + b"\xff\n")  # past the first block of lines
    with pytest.raises(TextError, match=r"bad.txt:20002: not valid UTF-8 \(byte 1 "):
        read_lines(bad)
    assert read_lines(bad, errors="replace")[-1] == "\ufffd"
    broken = tmp_path / "c.txt.gz"
    broken.write_bytes(gzip.compress(b"a\nb\n" * 1000)[:-20])
    with pytest.raises(TextError, match=r"c\.txt\.gz: corrupt or truncated"):
        read_lines(broken)


def test_text_pair_files_plain_and_gz(tmp_path: Path) -> None:
    write(tmp_path / "train.en", [" a cat ", "a dog"])
    write(tmp_path / "train.de.gz", ["eine Katze", "ein Hund"], gz=True)
    write(tmp_path / "valid.en.gz", ["hello"], gz=True)
    write(tmp_path / "valid.de", ["hallo"])
    cfg = DataConfig(
        format=DataFormat.text,
        train=SplitConfig(src=str(tmp_path / "train.en"), tgt=str(tmp_path / "train.de.gz")),
        valid=SplitConfig(src=str(tmp_path / "valid.en.gz"), tgt=str(tmp_path / "valid.de")),
        test=SplitConfig(),
    )
    corpus = load_corpus(cfg)
    assert set(corpus) == {"train", "valid"}  # test not configured: skipped
    assert pairs(corpus["train"]) == [("a cat", "eine Katze"), ("a dog", "ein Hund")]
    assert pairs(corpus["valid"]) == [("hello", "hallo")]
    assert corpus["train"].column_names == ["src", "tgt"]
    with pytest.raises(CorpusError, match=r"no test split.*data\.test\.src and data\.test\.tgt"):
        load_split(cfg, "test")


def test_dir_and_stem_with_gz_fallback(tmp_path: Path) -> None:
    write(tmp_path / "train.en.gz", ["one", "two"], gz=True)
    write(tmp_path / "train.de.gz", ["eins", "zwei"], gz=True)
    write(tmp_path / "val.en", ["three"])
    write(tmp_path / "val.de.gz", ["drei"], gz=True)
    cfg = DataConfig(
        format=DataFormat.hub,  # local files take precedence over the hub when data.dir is set
        name="someone/not-downloaded",
        dir=str(tmp_path),
        valid=SplitConfig(split="validation", stem="val"),
    )
    corpus = load_corpus(cfg)
    assert set(corpus) == {"train", "valid"}  # no test.* files in dir: skipped
    assert pairs(corpus["train"]) == [("one", "eins"), ("two", "zwei")]
    assert pairs(corpus["valid"]) == [("three", "drei")]
    with pytest.raises(CorpusError, match=r"not found: .*test\.en"):
        load_split(cfg, "test")


def test_misaligned_files_name_both_paths_and_counts(tmp_path: Path) -> None:
    src = write(tmp_path / "train.en", ["a", "b", "c"])
    tgt = write(tmp_path / "train.de", ["x", "", "y", "z"])
    cfg = DataConfig(format=DataFormat.text, train=SplitConfig(src=str(src), tgt=str(tgt)))
    with pytest.raises(CorpusError) as error:
        load_split(cfg, "train")
    message = str(error.value)
    assert f"misaligned corpus: {src} has 3 lines but {tgt} has 4" == message


def test_empty_pairs_dropped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = write(tmp_path / "s.en", ["keep", "", "  ", "drop me", "keep too"])
    tgt = write(tmp_path / "s.de", ["behalten", "leer", "x", " \t", " auch "])
    cfg = DataConfig(format=DataFormat.text, train=SplitConfig(src=str(src), tgt=str(tgt)))
    with caplog.at_level(logging.WARNING, logger="seq2seq.data.corpus"):
        dataset = load_split(cfg, "train")
    assert pairs(dataset) == [("keep", "behalten"), ("keep too", "auch")]
    assert "train split: dropped 3 of 5 pairs" in caplog.text


def test_all_empty_split_and_unknown_format_error(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", ["\t", " \tx"])
    with pytest.raises(CorpusError, match=r"train split .* no non-empty pairs"):
        load_split(DataConfig(format=DataFormat.tsv, train=SplitConfig(path=str(path))), "train")
    with pytest.raises(CorpusError, match=r"data\.format='csv'; choose one of builtin, text"):
        load_split(DataConfig(format="csv"), "train")  # type: ignore[arg-type]


def test_tsv(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", ["a cat\teine Katze", "", "a dog\tein Hund"])
    cfg = DataConfig(format=DataFormat.tsv, train=SplitConfig(path=str(path)))
    assert pairs(load_split(cfg, "train")) == [("a cat", "eine Katze"), ("a dog", "ein Hund")]


@pytest.mark.parametrize("bad_line", ["no tab here", "one\ttwo\tthree"])
def test_tsv_bad_line_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    path = write(tmp_path / "train.tsv", ["a\tb", "c\td", bad_line])
    cfg = DataConfig(format=DataFormat.tsv, train=SplitConfig(path=str(path)))
    with pytest.raises(CorpusError, match=r"train\.tsv:3: expected 'source<TAB>target'"):
        load_split(cfg, "train")


def test_jsonl_both_shapes(tmp_path: Path) -> None:
    records = [
        {"src": "a cat", "tgt": "eine Katze"},
        {"translation": {"de": "ein Hund", "en": "a dog", "fr": "un chien"}},
    ]
    path = write(tmp_path / "train.jsonl", [json.dumps(r, ensure_ascii=False) for r in records])
    cfg = DataConfig(format=DataFormat.jsonl, train=SplitConfig(path=str(path)))
    assert pairs(load_split(cfg, "train")) == [("a cat", "eine Katze"), ("a dog", "ein Hund")]


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"src": "a"',
        '["a", "b"]',
        '{"translation": {"en": "a", "fr": "b"}}',
        '{"src": 1, "tgt": 2}',
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    path = write(tmp_path / "train.jsonl", ['{"src": "a", "tgt": "b"}', bad_line])
    cfg = DataConfig(format=DataFormat.jsonl, train=SplitConfig(path=str(path)))
    with pytest.raises(CorpusError, match=r"train\.jsonl:2: "):
        load_split(cfg, "train")


def test_missing_file_and_missing_train_config(tmp_path: Path) -> None:
    cfg = DataConfig(format=DataFormat.tsv, train=SplitConfig(path=str(tmp_path / "absent.tsv")))
    with pytest.raises(CorpusError, match=r"not found: .*absent\.tsv"):
        load_split(cfg, "train")
    train = write(tmp_path / "train.tsv", ["a\tb"])
    with pytest.raises(CorpusError, match=r"no valid split.*data\.valid\.path"):
        load_corpus(DataConfig(format=DataFormat.tsv, train=SplitConfig(path=str(train))))


def test_hub_rows_mapped_to_src_tgt(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: ``load_dataset`` is replaced by in-memory datasets of both hub shapes."""
    calls = []

    def fake_load_dataset(
        name: str, config: str | None, split: str, streaming: bool
    ) -> datasets.Dataset:
        calls.append((name, config, split))
        if split == "train":
            return datasets.Dataset.from_dict({"en": [" a cat", "x"], "de": ["eine Katze", ""]})
        return datasets.Dataset.from_dict({"translation": [{"de": "hallo", "en": "hello"}]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(
        format=DataFormat.hub, name="m30k", hub_name="someone/m30k", test=SplitConfig()
    )
    corpus = load_corpus(cfg)
    assert pairs(corpus["train"]) == [("a cat", "eine Katze")]
    assert pairs(corpus["valid"]) == [("hello", "hallo")]
    assert calls == [("someone/m30k", None, "train"), ("someone/m30k", None, "validation")]


def test_hub_failure_suggests_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = DataConfig(format=DataFormat.hub, name="someone/corpus")
    with pytest.raises(CorpusError, match=r"could not load dataset 'someone/corpus'.*data\.dir="):
        load_split(cfg, "train")


def test_builtin_gives_three_splits() -> None:
    cfg = DataConfig(builtin=BuiltinConfig(train_size=300, valid_size=40, test_size=30, seed=2))
    corpus = load_corpus(cfg)
    assert {name: len(ds) for name, ds in corpus.items()} == {"train": 300, "valid": 40, "test": 30}
    assert pairs(load_split(cfg, "test")) == pairs(corpus["test"])
    train_sources = set(corpus["train"]["src"])
    assert not train_sources & set(corpus["test"]["src"])


def test_real_multi30k_via_dir() -> None:
    if not MULTI30K.is_dir():
        pytest.skip(f"Multi30k not found in {MULTI30K}")
    cfg = DataConfig(
        format=DataFormat.hub,
        name="bentrevett/multi30k",
        dir=str(MULTI30K),
        train=SplitConfig(split="train", stem="train"),
        valid=SplitConfig(split="validation", stem="val"),
        test=SplitConfig(split="test", stem="test_2016_flickr"),
    )
    corpus = load_corpus(cfg)
    assert {name: len(ds) for name, ds in corpus.items()} == {
        "train": 29000,
        "valid": 1014,
        "test": 1000,
    }
    first = corpus["train"][0]
    assert first["src"].startswith("Two young") and first["tgt"].startswith("Zwei junge")


# ---------------------------------------------------------------- streamed training split


def _text_config(src: Path, tgt: Path) -> DataConfig:
    return DataConfig(format=DataFormat.text, train=SplitConfig(src=str(src), tgt=str(tgt)))


def test_streamed_pairs_equal_the_loaded_split(tmp_path: Path) -> None:
    src_lines = ["\ufeff a cat ", "", "two\r", "x\u2028y", *(f"line {i}" for i in range(30)), "  "]
    tgt_lines = ["eine Katze", "leer", " zwei", "x y", *(f"Zeile {i}" for i in range(30)), "z"]
    src = write(tmp_path / "train.en", src_lines)
    tgt = write(tmp_path / "train.de.gz", tgt_lines, gz=True)
    cfg = _text_config(src, tgt)
    source = train_source(cfg)
    assert source.files == (src, tgt)
    assert list(source.pairs()) == pairs(load_split(cfg, "train"))
    for size in (1, 7, 1000):  # chunk boundaries do not change the cleaned pairs
        cleaned = [clean(chunk.src, chunk.tgt) for chunk in source.chunks(size)]
        assert [p for s, t, _ in cleaned for p in zip(s, t, strict=True)] == list(source.pairs())


def test_streamed_misaligned_files_name_both_paths_and_counts(tmp_path: Path) -> None:
    src = write(tmp_path / "train.en", [f"s{i}" for i in range(25)])
    tgt = write(tmp_path / "train.de.gz", [f"t{i}" for i in range(23)], gz=True)
    source = train_source(_text_config(src, tgt))
    for size in (4, 5, 23, 100):
        with pytest.raises(CorpusError) as error:
            list(source.chunks(size))
        assert str(error.value) == f"misaligned corpus: {src} has 25 lines but {tgt} has 23"


def test_streamed_errors_name_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "train.en"
    src.write_bytes(b"ok\nfine\n\xff\n")
    tgt = write(tmp_path / "train.de", ["a", "b", "c"])
    with pytest.raises(CorpusError, match=r"train\.en:3: not valid UTF-8"):
        list(train_source(_text_config(src, tgt)).pairs())
    with pytest.raises(CorpusError, match=r"not found: .*nope\.en"):
        train_source(_text_config(tmp_path / "nope.en", tgt)).fingerprint  # noqa: B018


def test_train_source_streams_every_format(tmp_path: Path) -> None:
    write(tmp_path / "train.en.gz", ["one", "two"], gz=True)
    write(tmp_path / "train.de", ["eins", "zwei"])
    in_dir = train_source(DataConfig(format=DataFormat.hub, name="x", dir=str(tmp_path)))
    assert in_dir.files == (tmp_path / "train.en.gz", tmp_path / "train.de")
    assert list(in_dir.pairs()) == [("one", "eins"), ("two", "zwei")]
    tsv = write(tmp_path / "train.tsv", ["a\tb", " c \td"])
    loaded = train_source(DataConfig(format=DataFormat.tsv, train=SplitConfig(path=str(tsv))))
    assert loaded.paths == (tsv,) and list(loaded.pairs()) == [("a", "b"), ("c", "d")]
    builtin = train_source(DataConfig(builtin=BuiltinConfig(train_size=30, seed=2)))
    assert len(list(builtin.pairs())) == 30
    with pytest.raises(CorpusError, match=r"data\.format='csv'"):
        train_source(DataConfig(format="csv"))  # type: ignore[arg-type]


def test_fingerprint_follows_the_files(tmp_path: Path) -> None:
    src = write(tmp_path / "train.en", ["a", "b"])
    tgt = write(tmp_path / "train.de", ["x", "y"])
    first = train_source(_text_config(src, tgt)).fingerprint
    assert first == train_source(_text_config(src, tgt)).fingerprint
    write(tgt, ["x", "z"])  # same size: the content sample (and mtime) tell them apart
    second = train_source(_text_config(src, tgt)).fingerprint
    assert second != first
    os.utime(tgt, ns=(1, 1))
    assert train_source(_text_config(src, tgt)).fingerprint != second
    loaded = DataConfig(builtin=BuiltinConfig(train_size=30, seed=2))
    other = DataConfig(builtin=BuiltinConfig(train_size=30, seed=3))
    assert train_source(loaded).fingerprint == train_source(loaded).fingerprint
    assert train_source(loaded).fingerprint != train_source(other).fingerprint


def _middle_edited(path: Path, *, replace: bool) -> None:
    """Two lines in the middle swapped at the same size, old times put back: in
    place like an editor, or as a new file renamed over it like ``cp -p`` + ``mv``."""
    before = path.stat()
    lines = path.read_bytes().splitlines(keepends=True)
    middle = len(lines) // 2
    lines[middle], lines[middle + 1] = lines[middle + 1], lines[middle]
    target = path.with_name(path.name + ".new") if replace else path
    with target.open("r+b" if not replace else "wb") as handle:
        handle.write(b"".join(lines))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    if replace:
        target.replace(path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("replace", [False, True], ids=["in place", "replaced"])
def test_fingerprint_sees_an_edit_under_the_old_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replace: bool
) -> None:
    monkeypatch.setattr(corpus, "SAMPLE_BYTES", 64)  # the edit is far from both samples
    src = write(tmp_path / "train.en", [f"sentence number {i}" for i in range(100)])
    tgt = write(tmp_path / "train.de", [f"Satz Nummer {i}" for i in range(100)])
    first = train_source(_text_config(src, tgt))
    fingerprint, digest = first.fingerprint, first.content_digest
    _middle_edited(src, replace=replace)
    edited = train_source(_text_config(src, tgt))
    assert edited.fingerprint != fingerprint
    assert edited.content_digest != digest


def test_content_digest_follows_the_bytes_not_the_names_or_times(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    src = write(tmp_path / "a" / "train.en", ["one", "two"])
    tgt = write(tmp_path / "a" / "train.de", ["eins", "zwei"])
    original = train_source(_text_config(src, tgt))
    copy = tmp_path / "b"
    copy.mkdir()
    copies = [copy / "train.en", copy / "train.de"]
    for old, new in zip((src, tgt), copies, strict=True):
        new.write_bytes(old.read_bytes())
    copied = train_source(_text_config(*copies))
    assert copied.fingerprint != original.fingerprint
    assert copied.content_digest == original.content_digest
    swapped = train_source(_text_config(tgt, src))
    assert swapped.content_digest != original.content_digest
    loaded = train_source(DataConfig(builtin=BuiltinConfig(train_size=30, seed=2)))
    assert loaded.content_digest == loaded.fingerprint
    (copy / "train.de").unlink()
    with pytest.raises(CorpusError, match=r"not found: .*b/train\.de"):
        train_source(_text_config(*copies)).content_digest  # noqa: B018
