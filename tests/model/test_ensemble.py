"""Ensembles: decode like one model, average their members, round-trip as bundles."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from seq2seq.config import DecodeConfig, ModelConfig, TokenizerConfig, TrainApp
from seq2seq.data.tokenizer import train_or_load
from seq2seq.decoding.ensemble import for_search
from seq2seq.decoding.translator import Translator
from seq2seq.model import bundle
from seq2seq.model.ensemble import Ensemble
from tests.helpers import lively_model, tiny_model


def translator(model, tokenizer, **decode) -> Translator:
    settings = {"max_len_a": 1.0, "max_len_b": 4, **decode}
    return Translator(model, tokenizer, DecodeConfig(**settings))


def sources(pairs, count: int = 12) -> list[str]:
    return [src for src, _ in pairs[:count]]


def config() -> TrainApp:
    return TrainApp(
        model=ModelConfig(embedding_size=8, hidden_size=16, attention_size=8, dropout=0.0),
        run_dir="unused",
    )


@pytest.mark.parametrize("beam", [1, 3])
def test_a_model_twice_translates_like_the_model(tokenizer, pairs, beam):
    model = lively_model(tokenizer, seed=1)
    twice = Ensemble([model, copy.deepcopy(model)])
    single = translator(model, tokenizer, beam_size=beam).hypotheses(sources(pairs))
    double = translator(twice, tokenizer, beam_size=beam).hypotheses(sources(pairs))
    assert len({hyps[0].text for hyps in single}) > 3  # outputs vary with the input
    for a, b in zip(single, double, strict=True):
        assert [h.text for h in a] == [h.text for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-4)


def test_steps_score_with_the_mean_of_member_log_probs(tokenizer, pairs):
    members = [lively_model(tokenizer, seed=1), lively_model(tokenizer, seed=2)]
    ensemble = Ensemble(members)
    src = torch.tensor([tokenizer.encode_src([pairs[0][0]])[0]])
    lengths = torch.tensor([src.size(1)])
    prev = torch.tensor([1])
    searched = for_search(ensemble)
    with torch.no_grad():
        enc = searched.encode(src, lengths)
        scores, _, _ = searched.step(prev, searched.init_state(enc), enc)
        each = []
        for m in members:
            m_enc = m.encode(src, lengths)
            logits, _, _ = m.decode_step(prev, m.init_state(m_enc), m_enc)
            each.append(torch.log_softmax(logits, dim=-1))
    # search ranks the mean renormalised (the normalised geometric mean)
    mean = (each[0] + each[1]) / 2
    torch.testing.assert_close(scores.log_probs(), torch.log_softmax(mean, dim=-1))
    assert not torch.allclose(each[0], each[1])  # the members really differ


@pytest.mark.parametrize("beam", [1, 4])
def test_output_does_not_depend_on_the_batch(tokenizer, pairs, beam):
    ensemble = Ensemble([lively_model(tokenizer, seed=1), lively_model(tokenizer, seed=2)])
    lines = sources(pairs, 9)
    whole = translator(ensemble, tokenizer, beam_size=beam, batch_size=9).hypotheses(lines)
    one_by_one = translator(ensemble, tokenizer, beam_size=beam, batch_size=1).hypotheses(lines)
    assert len(whole) == len(lines)
    for a, b in zip(whole, one_by_one, strict=True):
        assert [h.text for h in a] == [h.text for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-4)


def test_members_need_one_target_vocabulary(tokenizer):
    small = tiny_model(tokenizer)
    other = copy.deepcopy(small)
    other.decoder.generator = torch.nn.Linear(8, 7)
    with pytest.raises(ValueError, match="different target vocabularies"):
        Ensemble([small, other])
    with pytest.raises(ValueError, match="at least 2 members"):
        Ensemble([small])


def test_bundle_round_trip_is_self_contained(tmp_path, tokenizer, pairs):
    members = [lively_model(tokenizer, seed=1), lively_model(tokenizer, seed=2)]
    paths = [
        bundle.save(tmp_path / f"m{k}", model=m, config=config(), tokenizer=tokenizer)
        for k, m in enumerate(members)
    ]
    written = bundle.save_ensemble(tmp_path / "ens", paths)
    moved = shutil.move(written, tmp_path / "elsewhere")
    for path in paths:
        shutil.rmtree(path)
    loaded = bundle.load(moved)
    assert isinstance(loaded.model, Ensemble)
    assert bundle.load_config(moved) == config()
    lines = sources(pairs)
    expected = translator(Ensemble(members), tokenizer, beam_size=3).translate(lines)
    assert translator(loaded.model, loaded.tokenizer, beam_size=3).translate(lines) == expected
    from_bundle = Translator.from_bundle(moved, decode=DecodeConfig(max_len_a=1.0, max_len_b=4))
    assert from_bundle.with_decode(beam_size=3).translate(lines) == expected


def test_members_must_share_their_tokenizer(tmp_path, tokenizer, pairs):
    cfg = TokenizerConfig(vocab_size=100, cache_dir=str(tmp_path / "spm"))
    other = train_or_load([s for s, _ in pairs], [t for _, t in pairs], cfg)
    a = bundle.save(
        tmp_path / "a", model=tiny_model(tokenizer), config=config(), tokenizer=tokenizer
    )
    b = bundle.save(tmp_path / "b", model=tiny_model(other), config=config(), tokenizer=other)
    with pytest.raises(bundle.BundleError, match="different SentencePiece models"):
        bundle.save_ensemble(tmp_path / "ens", [a, b])
    assert not (tmp_path / "ens").exists()
    with pytest.raises(bundle.BundleError, match="at least 2"):
        bundle.save_ensemble(tmp_path / "ens", [a])
    pair = bundle.save_ensemble(tmp_path / "pair", [a, a])
    with pytest.raises(bundle.BundleError, match="must be single models"):
        bundle.save_ensemble(tmp_path / "nested", [pair, a])
