"""Translator invariants on a tiny untrained model: order, line count, batching, n-best."""

from __future__ import annotations

import logging

import pytest
import torch

from seq2seq.config import DecodeConfig, ModelConfig, TrainApp
from seq2seq.data.batching import pad
from seq2seq.data.tokenizer import BOS_ID, EOS_ID
from seq2seq.decoding.beam import beam_search
from seq2seq.decoding.translator import TextHypothesis, Translator, check_decode
from seq2seq.model import bundle
from seq2seq.runtime.device import pick_device
from seq2seq.training.validation import greedy_bleu
from tests.helpers import lively_model

LIMIT = 30  # decode.max_input_tokens in these tests


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively_model(tokenizer)


def make(model, tokenizer, **decode) -> Translator:
    settings = {"max_len_a": 1.0, "max_len_b": 5, "max_input_tokens": LIMIT, **decode}
    return Translator(model, tokenizer, DecodeConfig(**settings))


@pytest.fixture(scope="module")
def sentences(pairs):
    """12 distinct sources of different lengths, shuffled (not sorted by length)."""
    by_length = sorted({s for s, _ in pairs}, key=lambda s: (len(s), s))
    step = len(by_length) // 12
    picked = by_length[::step][:12]
    return picked[::2] + picked[1::2]


def long_line(tokenizer, pairs) -> str:
    line = " ".join(s for s, _ in pairs[:12])
    assert len(tokenizer.encode_src([line])[0]) > LIMIT
    return line


# ------------------------------------------------------------------ one result per line


def test_sentences_fixture_is_varied(model, tokenizer, sentences):
    lengths = {len(ids) for ids in tokenizer.encode_src(sentences)}
    outputs = make(model, tokenizer, beam_size=1).translate(sentences)
    assert len(lengths) >= 6
    assert len(set(outputs)) >= 10


def test_order_and_count_with_empty_duplicate_and_long_lines(model, tokenizer, pairs, caplog):
    a, b = pairs[0][0], pairs[1][0]
    long = long_line(tokenizer, pairs)
    lines = [a, "", "   \t", a, b, long, f"  {a}  ", b]
    translator = make(model, tokenizer, beam_size=2)
    with caplog.at_level(logging.WARNING, logger="seq2seq.decoding.translator"):
        out = translator.translate(lines)
    assert len(out) == len(lines)
    assert out[1] == out[2] == ""
    assert out[0] == out[3] == out[6] == translator.translate([a])[0]
    assert out[4] == out[7] == translator.translate([b])[0]
    assert out[5] == translator.translate([long])[0] != ""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "line 6" in w and f"truncated to decode.max_input_tokens={LIMIT}" in w for w in warnings
    )


def test_long_line_is_translated_truncated(model, tokenizer, pairs):
    long = long_line(tokenizer, pairs)
    translator = make(model, tokenizer, beam_size=1)
    [[hyp]] = translator.hypotheses([long])
    [[expected]] = translator.search_ids([tokenizer.encode_src([long])[0][:LIMIT]])
    assert hyp.tokens == tuple(expected.tokens)
    assert len(hyp.src_pieces) == LIMIT


def test_empty_input_gives_no_hypotheses_and_no_model_call(model, tokenizer, monkeypatch):
    def explode(*args):
        raise AssertionError("the model was called")

    translator = Translator(model, tokenizer, DecodeConfig())
    monkeypatch.setattr(translator.searched, "encode", explode)
    assert translator.hypotheses(["", "  ", "\t"]) == [[], [], []]
    assert translator.translate([]) == []


# --------------------------------------------------------------------------- streaming


def test_stream_in_chunks_equals_one_call(model, tokenizer, sentences, pairs, caplog):
    lines = [*sentences[:4], "", sentences[0], long_line(tokenizer, pairs), *sentences[4:7]]
    translator = make(model, tokenizer, beam_size=3, nbest=2)
    whole = translator.hypotheses(lines)
    with caplog.at_level(logging.WARNING, logger="seq2seq.decoding.translator"):
        streamed = list(translator.translate_stream(iter(lines), chunk_size=3))
    assert [[h.text for h in hs] for hs in streamed] == [[h.text for h in hs] for hs in whole]
    for hs, ref in zip(streamed, whole, strict=True):
        assert [h.score for h in hs] == pytest.approx([h.score for h in ref], abs=1e-4)
    # line numbers in warnings count from the start of the stream, not of the chunk
    assert any("input line 7 " in r.getMessage() for r in caplog.records)


def test_stream_reads_one_chunk_at_a_time(model, tokenizer, sentences):
    consumed = []

    def lines():
        for line in sentences:
            consumed.append(line)
            yield line

    stream = make(model, tokenizer, beam_size=1).translate_stream(lines(), chunk_size=3)
    next(stream)
    assert len(consumed) == 3
    assert len(list(stream)) == len(sentences) - 1


def test_stream_rejects_bad_chunk_size(model, tokenizer):
    with pytest.raises(ValueError, match="chunk_size=0"):
        list(make(model, tokenizer).translate_stream(["a"], chunk_size=0))


# ---------------------------------------------------------------------------- batching


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("beam_size", [1, 5])
def test_translation_never_depends_on_batch_size(model, tokenizer, sentences, beam_size, precision):
    results = []
    for batch_size in (1, 3, 64):
        translator = make(
            model, tokenizer, beam_size=beam_size, batch_size=batch_size, precision=precision
        )
        results.append(translator.hypotheses(sentences))
    texts = [[hs[0].text for hs in r] for r in results]
    assert texts[0] == texts[1] == texts[2]
    for r in results[1:]:
        for hs, ref in zip(r, results[0], strict=True):
            assert hs[0].score == pytest.approx(ref[0].score, abs=1e-4)


@pytest.mark.parametrize("beam_size", [1, 5])
def test_batches_searched_side_by_side_give_the_same_results(
    model, tokenizer, sentences, beam_size
):
    """Workers only change which batches run at once: same n-best lists, in input
    order, and the intra-op thread count is given back afterwards."""
    threads = torch.get_num_threads()
    results = []
    for workers in (1, 3):
        translator = make(model, tokenizer, beam_size=beam_size, batch_size=2, workers=workers)
        results.append(translator.hypotheses(sentences))
        assert torch.get_num_threads() == threads
    alone, side_by_side = ([[(h.tokens, h.score) for h in hs] for hs in r] for r in results)
    assert side_by_side == alone


def test_beam_1_equals_greedy(model, tokenizer, sentences):
    translator = make(model, tokenizer, beam_size=1, batch_size=4)
    ids = tokenizer.encode_src(sentences)
    greedy_tokens = [hs[0].tokens for hs in translator.search_ids(ids)]
    src, lengths = pad(ids)
    beam = beam_search(
        translator.searched,
        src,
        lengths,
        beam_size=1,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        max_len_a=1.0,
        max_len_b=5,
    )
    assert greedy_tokens == [hs[0].tokens for hs in beam]


def test_nbest_sorted_by_score_and_led_by_the_1best(model, tokenizer, sentences):
    nbest = make(model, tokenizer, beam_size=5, nbest=3).hypotheses(sentences)
    best = make(model, tokenizer, beam_size=5, nbest=1).translate(sentences)
    for hyps, one in zip(nbest, best, strict=True):
        assert len(hyps) == 3
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({h.tokens for h in hyps}) == 3
        assert hyps[0].text == one


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("beam_size", [1, 4])
def test_attention_rows_are_target_pieces_and_eos(model, tokenizer, pairs, beam_size):
    lines = [pairs[3][0], "", long_line(tokenizer, pairs)]
    translator = make(model, tokenizer, beam_size=beam_size, nbest=min(2, beam_size))
    results = translator.hypotheses(lines, attention=True)
    assert results[1] == []
    for line, hyps in zip(lines[::2], results[::2], strict=True):
        n_src = min(LIMIT, len(tokenizer.encode_src([line])[0]))
        for h in hyps:
            assert isinstance(h, TextHypothesis)
            assert h.src_pieces == tuple(tokenizer.src_pieces(line)[:n_src])
            assert h.tgt_pieces == (*tokenizer.tgt_pieces(h.tokens), "</s>")
            assert h.attention is not None
            assert h.attention.shape == (len(h.tokens) + 1, n_src)
            torch.testing.assert_close(h.attention.sum(-1), torch.ones(len(h.tokens) + 1))


def test_attention_only_when_asked(model, tokenizer, pairs):
    [[hyp]] = make(model, tokenizer, beam_size=1).hypotheses([pairs[0][0]])
    assert hyp.attention is None


# ------------------------------------------------------------------------ construction


def test_bundle_round_trip_translates_the_same(model, tokenizer, sentences, tmp_path):
    config = TrainApp(
        model=ModelConfig(embedding_size=8, hidden_size=16, attention_size=8, dropout=0.0),
        run_dir="x",
    )
    bundle.save(tmp_path / "b", model=model, config=config, tokenizer=tokenizer)
    decode = DecodeConfig(beam_size=2, max_len_a=1.0, max_len_b=5)
    loaded = Translator.from_bundle(tmp_path / "b", decode=decode, device="cpu")
    assert loaded.decode is decode
    assert loaded.translate(sentences) == Translator(model, tokenizer, decode).translate(sentences)
    assert Translator.from_bundle(tmp_path / "b", device="cpu").decode == config.decode


def test_with_decode_shares_the_model(model, tokenizer):
    translator = make(model, tokenizer, beam_size=5, nbest=3)
    greedy = translator.with_decode(beam_size=1, nbest=1)
    assert greedy.model is model
    assert greedy.searched is translator.searched  # built once, from the same weights
    assert (greedy.decode.beam_size, greedy.decode.nbest) == (1, 1)
    assert greedy.decode.max_input_tokens == LIMIT


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"beam_size": 0}, "decode.beam_size=0"),
        ({"beam_size": 2, "nbest": 3}, "decode.nbest=3 must be between 1 and decode.beam_size=2"),
        ({"batch_size": 0}, "decode.batch_size=0"),
        ({"workers": -1}, "decode.workers=-1"),
    ],
)
def test_bad_decode_settings_fail_early(changes, message):
    with pytest.raises(ValueError, match=message):
        check_decode(DecodeConfig(**changes))


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="choose one of auto, cpu, cuda"):
        pick_device("gpu")


def test_validation_bleu_reads_only_the_first_valid_max_sentences(model, tokenizer, sentences):
    """``train.valid_max_sentences``: validation scores greedy output on that many
    sentences (all of them when 0)."""
    translator = make(model, tokenizer, beam_size=3, max_len_b=12)
    greedy_lines = translator.with_decode(beam_size=1, nbest=1).translate(sentences)
    refs = greedy_lines[:3] + ["nothing like it"] * (len(sentences) - 3)
    assert greedy_bleu(translator, sentences, refs, limit=3) == pytest.approx(100.0)
    assert greedy_bleu(translator, sentences, refs, limit=0) < 50.0
