"""A live batch: sentences entering and leaving a running search get the translation
that searching each alone gives (greedy and beam, n-best, attention)."""

from __future__ import annotations

import random

import pytest
import torch

from seq2seq.config import DecodeConfig
from seq2seq.decoding.translator import TextHypothesis, Translator
from seq2seq.model.ensemble import Ensemble
from tests.helpers import lively_model, tiny_model

SETTINGS = [(1, 1), (3, 1), (3, 3)]  # (beam_size, nbest)


@pytest.fixture(scope="module")
def lines(pairs) -> list[str]:
    """Sources of many lengths, in no order."""
    picked = sorted({s for s, _ in pairs}, key=len)[::9][:20]
    random.Random(3).shuffle(picked)
    return picked


def make(model, tokenizer, beam_size: int, nbest: int, **decode) -> Translator:
    settings = {"max_len_a": 1.2, "max_len_b": 4, "alpha": 0.6, **decode}
    return Translator(model, tokenizer, DecodeConfig(beam_size=beam_size, nbest=nbest, **settings))


def run_live(translator: Translator, lines: list[str], arrivals: list[int], *, attention: bool):
    """Line i joins the live batch at step ``arrivals[i]`` (several may join at once,
    possibly into an empty batch); returns each line's n-best texts."""
    live = translator.live(attention=attention)
    ids = translator.source_ids(lines)
    found: dict[int, list[TextHypothesis]] = {}
    step = 0
    with translator.search_mode():
        while len(found) < len(lines):
            joining = [i for i, at in enumerate(arrivals) if at == step]
            live.add([ids[i] for i in joining], joining)
            for i, hyps in live.step():
                found[i] = translator.texts(lines[i], ids[i], hyps)
            step += 1
            assert step < 1000
    assert live.size == 0 and live.pieces == 0
    return [found[i] for i in range(len(lines))]


def assert_same(got: list[TextHypothesis], want: list[TextHypothesis], attention: bool) -> None:
    assert [h.text for h in got] == [h.text for h in want]
    assert [h.tokens for h in got] == [h.tokens for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5, abs=1e-6)
    assert [h.log_prob for h in got] == pytest.approx([h.log_prob for h in want], rel=1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.src_pieces == w.src_pieces and g.tgt_pieces == w.tgt_pieces
        if attention:
            assert g.attention is not None and w.attention is not None
            torch.testing.assert_close(g.attention, w.attention)
        else:
            assert g.attention is None


@pytest.mark.parametrize(("beam_size", "nbest"), SETTINGS)
@pytest.mark.parametrize("attention", [False, True])
def test_sentences_joining_a_running_search_translate_as_alone(
    tokenizer, lines, beam_size, nbest, attention
):
    translator = make(lively_model(tokenizer), tokenizer, beam_size, nbest)
    rng = random.Random(beam_size * 10 + nbest)
    # Some join at the start, others at later steps, some into a batch already empty.
    arrivals = sorted(rng.choice([0, 0, 1, 2, 3, 5, 8, 13, 40]) for _ in lines)
    got = run_live(translator, lines, arrivals, attention=attention)
    for line, hyps in zip(lines, got, strict=True):
        want = translator.hypotheses([line], attention=attention)[0]
        assert_same(hyps, want, attention)
    assert len({h[0].text for h in got}) > 5  # the lines really translate differently


@pytest.mark.parametrize(("beam_size", "nbest"), SETTINGS)
def test_one_at_a_time_and_all_at_once_agree(tokenizer, lines, beam_size, nbest):
    """Each sentence joining at its own step, and all joining at step 0, equal the
    offline batched search."""
    translator = make(lively_model(tokenizer, softmax_head=40), tokenizer, beam_size, nbest)
    want = translator.hypotheses(lines)
    for arrivals in (list(range(len(lines))), [0] * len(lines)):
        got = run_live(translator, lines, arrivals, attention=False)
        for hyps, ref in zip(got, want, strict=True):
            assert_same(hyps, ref, attention=False)


@pytest.mark.parametrize("kind", ["none", "lstm", "ensemble"])
def test_other_models_join_too(tokenizer, lines, kind):
    """No attention (a one-position read-out), an LSTM decoder (a cell state) and an
    ensemble (one encoding per member)."""
    if kind == "none":
        model = tiny_model(tokenizer, attention="none", seed=2)
    elif kind == "lstm":
        model = tiny_model(tokenizer, cell="lstm", seed=3)
    else:
        model = Ensemble([lively_model(tokenizer, seed=4), lively_model(tokenizer, seed=5)])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if kind != "ensemble" else 1.0)
    for beam_size, nbest in ((1, 1), (2, 2)):
        translator = make(model, tokenizer, beam_size, nbest)
        arrivals = [i // 3 for i in range(len(lines))]
        got = run_live(translator, lines, arrivals, attention=True)
        for line, hyps in zip(lines, got, strict=True):
            assert_same(hyps, translator.hypotheses([line], attention=True)[0], attention=True)


@pytest.mark.parametrize(("beam_size", "nbest"), SETTINGS)
def test_a_batch_that_emptied_takes_narrower_sentences(tokenizer, lines, beam_size, nbest):
    """The longest line alone, then (after the batch has emptied) the shortest: the
    second translates as alone, attention included."""
    translator = make(lively_model(tokenizer), tokenizer, beam_size, nbest)
    pair = [max(lines, key=len), min(lines, key=len)]
    got = run_live(translator, pair, [0, 200], attention=True)
    for line, hyps in zip(pair, got, strict=True):
        assert_same(hyps, translator.hypotheses([line], attention=True)[0], attention=True)


def test_an_empty_live_batch_steps_to_nothing(tokenizer):
    live = make(lively_model(tokenizer), tokenizer, 2, 1).live(attention=False)
    assert live.step() == [] and live.size == 0
