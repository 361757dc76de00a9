"""SentencePiece stage: fixed special ids, round-trips, cache, serialization."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import sentencepiece as spm

from seq2seq.config import PieceModel, TokenizerConfig
from seq2seq.data import tokenizer as tokenizer_module
from seq2seq.data.builtin import generate_pairs
from seq2seq.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    cache_key,
    reservoir_sample,
    source_cache_key,
    train_or_load,
    train_or_load_pairs,
)

PAIRS = generate_pairs(400, seed=11)
SRC = [s for s, _ in PAIRS]
TGT = [t for _, t in PAIRS]


def config(tmp_path: Path, **overrides: object) -> TokenizerConfig:
    settings: dict = {"vocab_size": 96, "cache_dir": str(tmp_path / "spm"), **overrides}
    return TokenizerConfig(**settings)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_or_load(SRC, TGT, config(tmp_path_factory.mktemp("tok")))


def test_special_ids_are_fixed(tokenizer: Tokenizer) -> None:
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    for processor in (tokenizer.src, tokenizer.tgt):
        assert processor.pad_id() == PAD_ID
        assert processor.unk_id() == UNK_ID
        assert processor.bos_id() == BOS_ID
        assert processor.eos_id() == EOS_ID
        pieces = [processor.id_to_piece(i) for i in range(4)]
        assert pieces == ["<pad>", "<unk>", "<s>", "</s>"]


def test_encode_decode_round_trip(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode_tgt(TGT)
    assert all(ids) and all(i >= 4 for row in ids for i in row)  # no specials added
    assert tokenizer.decode_tgt(ids) == TGT
    src_ids = tokenizer.encode_src(SRC[:20])
    assert [len(tokenizer.src_pieces(s)) for s in SRC[:20]] == [len(r) for r in src_ids]


def test_a_few_lines_give_what_a_large_batch_gives(tokenizer: Tokenizer) -> None:
    """A few lines take a loop and many SentencePiece's batch call: same ids, same text."""
    ids = tokenizer.encode_tgt(TGT[:100])
    assert [tokenizer.encode_tgt([line])[0] for line in TGT[:100]] == ids
    assert tokenizer.encode_src(SRC[:3]) == tokenizer.encode_src(SRC[:100])[:3]
    assert [tokenizer.decode_tgt([row])[0] for row in ids] == tokenizer.decode_tgt(ids)
    assert tokenizer.decode_tgt([[], [EOS_ID]]) == ["", ""]


def test_decode_strips_pad_bos_eos(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode_tgt(TGT[:2])
    padded = [[BOS_ID, *ids[0], EOS_ID, PAD_ID, PAD_ID], [*ids[1], EOS_ID]]
    assert tokenizer.decode_tgt(padded) == TGT[:2]


def test_pieces_for_plots(tokenizer: Tokenizer) -> None:
    pieces = tokenizer.src_pieces("ninety-four")
    assert "".join(pieces).replace("▁", " ").strip() == "ninety-four"
    ids = tokenizer.encode_tgt(["vierundneunzig"])[0]
    assert tokenizer.tgt_pieces([*ids, EOS_ID])[-1] == "</s>"


def test_vocab_sizes_and_separate_models(tokenizer: Tokenizer) -> None:
    assert not tokenizer.joint
    assert tokenizer.src is not tokenizer.tgt
    assert 4 < tokenizer.src_vocab_size <= 96 and 4 < tokenizer.tgt_vocab_size <= 96


@pytest.mark.parametrize("model_type", [PieceModel.unigram, PieceModel.bpe])
def test_model_types_train_and_are_deterministic(tmp_path: Path, model_type: PieceModel) -> None:
    first = train_or_load(SRC, TGT, config(tmp_path / "a", model_type=model_type))
    second = train_or_load(SRC, TGT, config(tmp_path / "b", model_type=model_type))
    assert first.serialize() == second.serialize()  # trained twice, byte-identical
    assert first.decode_tgt(first.encode_tgt(TGT[:50])) == TGT[:50]


def test_unigram_and_bpe_differ(tmp_path: Path) -> None:
    unigram = train_or_load(SRC, TGT, config(tmp_path, model_type=PieceModel.unigram))
    bpe = train_or_load(SRC, TGT, config(tmp_path, model_type=PieceModel.bpe))
    assert unigram.serialize() != bpe.serialize()
    assert len(list((tmp_path / "spm").iterdir())) == 2  # one cache entry each


def test_joint_model_shared_by_both_sides(tmp_path: Path) -> None:
    tokenizer = train_or_load(SRC, TGT, config(tmp_path, joint=True))
    assert tokenizer.joint and tokenizer.src is tokenizer.tgt
    assert tokenizer.src_vocab_size == tokenizer.tgt_vocab_size
    files = tokenizer.serialize()
    assert files["src.spm"] == files["tgt.spm"]
    assert tokenizer.encode_src(["Germany"]) == tokenizer.encode_tgt(["Germany"])


def test_cache_hit_does_not_retrain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path)
    first = train_or_load(SRC, TGT, cfg)
    key = cache_key(SRC, TGT, cfg)
    names = sorted(p.name for p in (tmp_path / "spm" / key).iterdir())
    assert names == ["src.spm", "sums.json", "tgt.spm"]

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", fail)
    with caplog.at_level(logging.INFO, logger="seq2seq.data.tokenizer"):
        second = train_or_load(SRC, TGT, cfg)
    assert "loaded cached tokenizer from" in caplog.text
    assert second.encode_src(SRC) == first.encode_src(SRC)
    with pytest.raises(AssertionError, match="retrained"):  # other settings: new key
        train_or_load(SRC, TGT, config(tmp_path, vocab_size=90))


@pytest.mark.parametrize("damage", ["swapped", "replaced", "no_sums"])
def test_a_cache_whose_models_were_changed_is_trained_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """Swapped, replaced or unvouched-for models in the cache are never used: they
    would encode every sentence with the wrong pieces, silently."""
    cfg = config(tmp_path)
    first = train_or_load(SRC, TGT, cfg)
    directory = tmp_path / "spm" / cache_key(SRC, TGT, cfg)
    src, tgt = directory / "src.spm", directory / "tgt.spm"
    original = {src: src.read_bytes(), tgt: tgt.read_bytes()}
    if damage == "swapped":
        src.write_bytes(original[tgt])
        tgt.write_bytes(original[src])
    elif damage == "replaced":
        other = train_or_load(SRC, TGT, config(tmp_path / "other", vocab_size=90))
        src.write_bytes(other.serialize()["src.spm"])
    else:
        (directory / "sums.json").unlink()
    with caplog.at_level(logging.INFO, logger="seq2seq.data.tokenizer"):
        second = train_or_load(SRC, TGT, cfg)
    assert "ignoring the cached tokenizer" in caplog.text
    assert second.encode_src(SRC) == first.encode_src(SRC)
    assert second.encode_tgt(TGT) == first.encode_tgt(TGT)
    assert {path: path.read_bytes() for path in original} == original


def test_cache_key_depends_on_data_and_settings(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    key = cache_key(SRC, TGT, cfg)
    assert key == cache_key(list(SRC), list(TGT), config(tmp_path / "elsewhere"))
    assert key != cache_key(SRC[:-1], TGT[:-1], cfg)
    assert key != cache_key(TGT, SRC, cfg)
    assert key != cache_key(SRC, TGT, config(tmp_path, model_type=PieceModel.bpe))
    assert key == cache_key(SRC, TGT, config(tmp_path, model_type=PieceModel.unigram))
    assert key != cache_key(SRC, TGT, config(tmp_path, joint=True))


def test_serialize_round_trip(tokenizer: Tokenizer) -> None:
    restored = Tokenizer.from_serialized(tokenizer.serialize())
    assert not restored.joint
    assert restored.encode_src(SRC) == tokenizer.encode_src(SRC)
    assert restored.encode_tgt(TGT) == tokenizer.encode_tgt(TGT)
    assert restored.serialize() == tokenizer.serialize()
    with pytest.raises(ValueError, match="missing"):
        Tokenizer.from_serialized({"src.spm": tokenizer.serialize()["src.spm"]})


def test_tiny_corpus_with_big_vocab_does_not_fail(tmp_path: Path) -> None:
    lines = ["a small corpus", "with few words", "a small test"]
    tokenizer = train_or_load(lines, lines, config(tmp_path, vocab_size=8000))
    assert tokenizer.src_vocab_size < 8000
    assert tokenizer.decode_tgt(tokenizer.encode_tgt(lines)) == lines
    bpe = train_or_load(lines, lines, config(tmp_path, vocab_size=8000, model_type=PieceModel.bpe))
    assert bpe.decode_tgt(bpe.encode_tgt(lines)) == lines


def test_too_small_vocab_explains(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size=8.*required_chars"):
        train_or_load(SRC, TGT, config(tmp_path, vocab_size=8))


def test_reservoir_sample_keeps_a_small_corpus_whole_and_in_order() -> None:
    src, tgt, seen = reservoir_sample(iter(PAIRS), len(PAIRS))
    assert (src, tgt, seen) == (SRC, TGT, len(PAIRS))


def test_reservoir_sample_is_seeded_bounded_and_spread() -> None:
    pairs = [(f"s{i}", f"t{i}") for i in range(5000)]
    src, tgt, seen = reservoir_sample(iter(pairs), 500)
    assert seen == 5000 and len(src) == len(tgt) == 500
    assert [s[1:] for s in src] == [t[1:] for t in tgt]  # the sides stay paired
    assert (src, tgt) == reservoir_sample(iter(pairs), 500)[:2]
    assert src != reservoir_sample(iter(pairs), 500, seed=1)[0]
    drawn = sorted(int(s[1:]) for s in src)
    assert len(set(drawn)) == 500
    late = sum(i >= 2500 for i in drawn)  # uniform: about half from the second half
    assert 200 < late < 300


def test_training_reads_the_pairs_once_and_samples_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer_module, "MAX_TRAINING_LINES", 150)
    seen: list[int] = []
    trained_on: list[int] = []
    real_train = tokenizer_module._train

    def counting_train(lines: list[str], cfg: TokenizerConfig, side: str) -> bytes:
        trained_on.append(len(lines))
        return real_train(lines, cfg, side)

    def read_pairs():  # type: ignore[no-untyped-def]
        seen.append(1)
        return iter(PAIRS)

    monkeypatch.setattr(tokenizer_module, "_train", counting_train)
    cfg = config(tmp_path)
    key = source_cache_key("corpus-a", cfg)
    train_or_load_pairs(read_pairs, key, cfg)
    assert seen == [1] and trained_on == [150, 150]
    train_or_load_pairs(read_pairs, key, cfg)  # cached: not read again
    assert seen == [1]
    joint = config(tmp_path, joint=True)
    train_or_load_pairs(read_pairs, source_cache_key("corpus-a", joint), joint)
    assert trained_on[-1] == 150  # 75 pairs, both sides


def test_source_cache_key_depends_on_fingerprint_and_settings(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    key = source_cache_key("a", cfg)
    assert key == source_cache_key("a", config(tmp_path / "elsewhere"))
    assert key != source_cache_key("b", cfg)
    assert key != source_cache_key("a", config(tmp_path, vocab_size=90))
    assert key != cache_key(SRC, TGT, cfg)
