"""Subword regularisation: seeded sampled segmentations of the training pairs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from seq2seq.config import TokenizerConfig, validate
from seq2seq.data import sampling
from seq2seq.data.batching import FlatIds
from seq2seq.data.builtin import generate_pairs
from seq2seq.data.sampling import SampledEpochs
from seq2seq.data.store import TokenStore
from seq2seq.data.tokenizer import Tokenizer, train_or_load
from tests.helpers import ROOT, checkout_env

Rows = list[tuple[list[int], list[int]]]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several chunks from the 200 test pairs, so work is spread over threads."""
    monkeypatch.setattr(sampling, "CHUNK_PAIRS", 16)


def _store(pairs: list[tuple[str, str]], tokenizer: Tokenizer) -> TokenStore:
    src = tokenizer.encode_src([s for s, _ in pairs])
    tgt = tokenizer.encode_tgt([t for _, t in pairs])
    return TokenStore(FlatIds.from_sequences(src), FlatIds.from_sequences(tgt))


def _rows(store: TokenStore) -> Rows:
    def side(flat: FlatIds) -> list[list[int]]:
        bounds = zip(flat.offsets[:-1], flat.offsets[1:], strict=True)
        return [flat.ids[a:b].tolist() for a, b in bounds]

    return list(zip(side(store.src), side(store.tgt), strict=True))


def _epochs(
    store: TokenStore,
    tokenizer: Tokenizer,
    *,
    alpha: float = 0.2,
    seed: int = 3,
    model_type: str = "unigram",
) -> SampledEpochs:
    return SampledEpochs(store, tokenizer, model_type=model_type, alpha=alpha, seed=seed)


@pytest.fixture
def store(pairs: list[tuple[str, str]], tokenizer: Tokenizer) -> TokenStore:
    return _store(pairs, tokenizer)


@pytest.fixture
def epochs(store: TokenStore, tokenizer: Tokenizer) -> Iterator[SampledEpochs]:
    sampled = _epochs(store, tokenizer)
    yield sampled
    sampled.close()


def test_a_seeded_epoch_is_the_same_twice_and_the_next_one_differs(
    epochs: SampledEpochs, store: TokenStore, tokenizer: Tokenizer
) -> None:
    first, second = _rows(epochs.epoch(0)), _rows(epochs.epoch(1))
    assert first != second
    assert first != _rows(store), "epoch 0 is sampled too"
    # Another instance, asked in another order.
    other = _epochs(store, tokenizer)
    try:
        assert _rows(other.epoch(1)) == second
        assert _rows(other.epoch(0)) == first
    finally:
        other.close()
    reseeded = _epochs(store, tokenizer, seed=4)
    try:
        assert _rows(reseeded.epoch(0)) != first, "another seed, another segmentation"
    finally:
        reseeded.close()


def test_a_pair_is_segmented_by_its_index_not_its_chunk(
    epochs: SampledEpochs, store: TokenStore, tokenizer: Tokenizer, monkeypatch
) -> None:
    first = _rows(epochs.epoch(0))
    monkeypatch.setattr(sampling, "CHUNK_PAIRS", 7)
    rechunked = _epochs(store, tokenizer)
    try:
        assert _rows(rechunked.epoch(0)) == first
    finally:
        rechunked.close()


def test_sampled_pieces_spell_the_same_sentences(
    epochs: SampledEpochs, tokenizer: Tokenizer, pairs: list[tuple[str, str]]
) -> None:
    rows = _rows(epochs.epoch(0))
    assert len(rows) == len(pairs)
    assert tokenizer.decode_tgt([t for _, t in rows]) == [t for _, t in pairs]
    assert tokenizer.src.decode([s for s, _ in rows]) == [s for s, _ in pairs]


def test_another_process_samples_the_same_epoch(
    epochs: SampledEpochs, tokenizer: Tokenizer, pairs: list[tuple[str, str]], tmp_path: Path
) -> None:
    """What resume and torchrun rely on (SentencePiece's own sampling fails it)."""
    tokenizer_dir = tmp_path / "tokenizer"
    for name, data in tokenizer.serialize().items():
        (tokenizer_dir / name).parent.mkdir(exist_ok=True)
        (tokenizer_dir / name).write_bytes(data)
    script = f"""
import json, sys
from pathlib import Path
from seq2seq.data import sampling
from seq2seq.data.builtin import generate_pairs
from seq2seq.data.tokenizer import Tokenizer
from tests.data.test_sampling import _epochs, _rows, _store
sampling.CHUNK_PAIRS = 16
files = {{p.name: p.read_bytes() for p in Path({str(tokenizer_dir)!r}).iterdir()}}
tokenizer = Tokenizer.from_serialized(files)
sampled = _epochs(_store(generate_pairs(200, seed=7), tokenizer), tokenizer)
json.dump(_rows(sampled.epoch(1)), sys.stdout)
sampled.close()
"""
    assert generate_pairs(200, seed=7) == pairs
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=checkout_env(), cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    theirs = [tuple(pair) for pair in json.loads(done.stdout)]
    assert theirs == _rows(epochs.epoch(1))


def test_a_sentence_with_an_unknown_piece_keeps_its_best_segmentation(
    tokenizer: Tokenizer, pairs: list[tuple[str, str]]
) -> None:
    """Its text cannot be recovered from the ids, so it is not sampled."""
    src = tokenizer.encode_src([s for s, _ in pairs])
    tgt = tokenizer.encode_tgt([t for _, t in pairs])
    src[0] = [src[0][0], 1, *src[0][1:]]  # an unknown piece inside the first word
    store = TokenStore(FlatIds.from_sequences(src), FlatIds.from_sequences(tgt))
    sampled = _epochs(store, tokenizer)
    try:
        rows = _rows(sampled.epoch(0))
    finally:
        sampled.close()
    assert rows[0][0][:2] == src[0][:2], "the word holding it keeps its pieces"
    assert [s for s, _ in rows[1:]] != src[1:]


def test_unigram_sampling_follows_the_model(tokenizer: Tokenizer, pairs: list[tuple[str, str]]):
    """Draws of one sentence spell it; both its best segmentation and others come
    up, and a larger alpha draws the best more often."""
    row = tokenizer.encode_src([pairs[0][0]])[0]

    def best_share(alpha: float) -> float:
        words = sampling.UnigramWords(tokenizer.src, alpha)
        starts = words.pieces.starts_word
        draws = [
            sampling.sample_sentence(row, words, starts, sampling.stream(i)) for i in range(400)
        ]
        assert all(tokenizer.src.decode(d) == tokenizer.src.decode(row) for d in draws)
        return sum(d == row for d in draws) / len(draws)

    assert 0 < best_share(0.5) < 1
    assert best_share(0.5) > best_share(0.05)


def test_closing_stops_the_worker_and_removes_its_files(
    store: TokenStore, tokenizer: Tokenizer
) -> None:
    sampled = _epochs(store, tokenizer)
    sampled.epoch(0)
    assert sampled.pending == 1, "the next epoch is being written"
    sampled.close()
    assert not sampled.root.exists()
    with pytest.raises(RuntimeError, match="closed"):
        sampled.epoch(2)


def test_bpe_dropout_zero_equals_plain_bpe(pairs: list[tuple[str, str]], tmp_path: Path) -> None:
    cfg = TokenizerConfig(model_type="bpe", vocab_size=120, cache_dir=str(tmp_path / "spm"))  # type: ignore[arg-type]
    bpe = train_or_load([s for s, _ in pairs], [t for _, t in pairs], cfg)
    store = _store(pairs, bpe)
    plain = _epochs(store, bpe, alpha=0.0, model_type="bpe")
    dropped = _epochs(store, bpe, alpha=0.2, model_type="bpe")
    try:
        assert _rows(plain.epoch(0)) == _rows(store)
        assert _rows(dropped.epoch(0)) != _rows(store)
    finally:
        plain.close()
        dropped.close()
    # Merging from characters without dropping reproduces SentencePiece's BPE.
    lines = [f"{s} {t}" for s, t in pairs]
    merged = sampling.BpeWords(bpe.tgt, 0.0)
    starts = merged.pieces.starts_word
    for row in bpe.encode_tgt(lines):
        assert sampling.sample_sentence(row, merged, starts, sampling.stream(0)) == row


@pytest.mark.parametrize(("model_type", "alpha"), [("unigram", -0.1), ("bpe", 1.0)])
def test_sampling_alpha_out_of_range_is_refused(model_type: str, alpha: float) -> None:
    config = TokenizerConfig(model_type=model_type, sampling_alpha=alpha)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tokenizer\.sampling_alpha"):
        validate(config, "tokenizer")
