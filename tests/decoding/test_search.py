"""Search tested without the real model (fairseq / OpenNMT style).

A scripted decoder reads its next-token probabilities from a table written here, so EOS
handling, the length penalty and n-best order can be checked exactly. A tiny seeded
"toy RNN" checks the invariants: beam-1 equals greedy, a wide beam equals exhaustive
search, and a translation does not depend on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from seq2seq.decoding.beam import beam_search
from seq2seq.decoding.search import (
    Hypothesis,
    greedy,
    length_penalty,
    max_lengths,
)
from seq2seq.model.softmax import FullScores

# ------------------------------------------------------------------------ scripted decoder

BOS, EOS, A, B = 0, 1, 2, 3

# P(next token | tokens so far). Greedy and alpha=0 prefer "A" (0.5 * 0.8 = 0.4) to
# "B B" (0.4 * 0.98 * 0.98 = 0.384); alpha=1 prefers "B B" for being longer.
TABLE: dict[tuple[int, ...], dict[int, float]] = {
    (): {A: 0.5, B: 0.4, EOS: 0.1},
    (A,): {EOS: 0.8, A: 0.1, B: 0.1},
    (B,): {B: 0.98, EOS: 0.01, A: 0.01},
    (B, B): {EOS: 0.98, A: 0.01, B: 0.01},
}
DEFAULT = {EOS: 0.5, A: 0.25, B: 0.25}
# A sentence that wants to go on: "A" at 0.9 after any run of up to 9 "A"s.
TALKATIVE = {(A,) * n: {A: 0.9, EOS: 0.1} for n in range(10)}
# K=1, alpha=3: "A" (0.6 * 0.6) is finished first and the live "A A" is no better at
# length 2, so the sentence is done; "A A" + EOS (0.6 * 0.4 * 1.0) would win at length 3.
STOPS_EARLY = {(): {A: 0.6, EOS: 0.4}, (A,): {EOS: 0.6, A: 0.4}, (A, A): {EOS: 1.0}}
# K=2: after "A", three of the four best extensions continue "A" ("A EOS" .30, "A A" .18,
# "B EOS" .15, "A B" .12), so the new beam needs the third-best token of one beam.
CROWDED = {
    (): {A: 0.6, B: 0.3, EOS: 0.1},
    (A,): {EOS: 0.5, A: 0.3, B: 0.2},
    (A, B): {EOS: 1.0},
}
TABLES = [TABLE, TALKATIVE, STOPS_EARLY, CROWDED]  # picked by the first source token


def log_p(*steps: tuple[tuple[int, ...], int]) -> float:
    """Log-prob of a path given as (prefix, token) pairs read from TABLE."""
    return sum(math.log(TABLE.get(prefix, DEFAULT)[token]) for prefix, token in steps)


@dataclass
class ScriptedEncoderOutput:
    table_ids: Tensor  # (B,) long, index into TABLES
    mask: Tensor  # (B, S) bool

    def select(self, index: Tensor) -> ScriptedEncoderOutput:
        return ScriptedEncoderOutput(self.table_ids[index], self.mask[index])


@dataclass
class ScriptedState:
    fed: Tensor  # (N, t) tokens fed so far, BOS first

    def select(self, index: Tensor) -> ScriptedState:
        return ScriptedState(self.fed[index])


class ScriptedDecoder:
    """Implements the `Searchable` protocol from TABLES, chosen by the first source token."""

    vocab = 4

    def encode(self, src: Tensor, src_lengths: Tensor) -> ScriptedEncoderOutput:
        mask = torch.arange(src.size(1))[None, :] < src_lengths[:, None]
        return ScriptedEncoderOutput(src[:, 0], mask)

    def init_state(self, enc: ScriptedEncoderOutput) -> ScriptedState:
        return ScriptedState(torch.zeros(enc.mask.size(0), 0, dtype=torch.long))

    def step(
        self, prev: Tensor, state: ScriptedState, enc: ScriptedEncoderOutput
    ) -> tuple[FullScores, ScriptedState, Tensor]:
        fed = torch.cat([state.fed, prev[:, None]], dim=1)
        probs = torch.zeros(prev.size(0), self.vocab)
        for row, (table_id, history) in enumerate(
            zip(enc.table_ids.tolist(), fed.tolist(), strict=True)
        ):
            for token, p in TABLES[table_id].get(tuple(history[1:]), DEFAULT).items():
                probs[row, token] = p
        attention = enc.mask.float() / enc.mask.sum(dim=1, keepdim=True)
        return FullScores(probs.log()), ScriptedState(fed), attention


def scripted_batch(*lengths: int, table_ids: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
    """(B, S) source whose first token picks the table (TABLE by default), (B,) lengths."""
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    src[:, 0] = torch.tensor(table_ids or (0,) * len(lengths))
    return src, torch.tensor(lengths)


def test_length_penalty_and_budget() -> None:
    assert length_penalty(3, 0.0) == 1.0
    assert length_penalty(7, 1.0) == pytest.approx(2.0)
    assert length_penalty(1, 2.0) == pytest.approx(1.0)
    budget = max_lengths(torch.tensor([0, 1, 3, 10]), 1.5, 2)
    assert budget.tolist() == [2, 3, 6, 17]
    assert max_lengths(torch.tensor([4]), 0.0, -3).tolist() == [0]


def test_greedy_follows_the_table() -> None:
    src, lengths = scripted_batch(2)
    [[hyp]] = greedy(
        ScriptedDecoder(), src, lengths, bos_id=BOS, eos_id=EOS, max_len_a=0.0, max_len_b=10
    )
    assert hyp.tokens == [A]
    assert hyp.log_prob == pytest.approx(log_p(((), A), ((A,), EOS)))
    assert hyp.score == hyp.log_prob


def two_best(table_id: int = 0, *, alpha: float) -> list[Hypothesis]:
    """Beam 2, 2-best, no budget in the way, for one scripted sentence."""
    src, lengths = scripted_batch(2, table_ids=(table_id,))
    [hyps] = beam_search(
        ScriptedDecoder(),
        src,
        lengths,
        beam_size=2,
        nbest=2,
        alpha=alpha,
        bos_id=BOS,
        eos_id=EOS,
        max_len_a=0.0,
        max_len_b=10,
    )
    return hyps


def test_nbest_order_and_scores_without_length_penalty() -> None:
    hyps = two_best(alpha=0.0)
    assert [h.tokens for h in hyps] == [[A], [B, B]]
    expected = [log_p(((), A), ((A,), EOS)), log_p(((), B), ((B,), B), ((B, B), EOS))]
    assert [h.log_prob for h in hyps] == pytest.approx(expected)
    assert [h.score for h in hyps] == pytest.approx(expected)


def test_length_penalty_changes_the_winner() -> None:
    hyps = two_best(alpha=1.0)
    assert [h.tokens for h in hyps] == [[B, B], [A]]
    long_lp = log_p(((), B), ((B,), B), ((B, B), EOS))
    short_lp = log_p(((), A), ((A,), EOS))
    assert [h.log_prob for h in hyps] == pytest.approx([long_lp, short_lp])
    expected = [long_lp / ((5 + 3) / 6), short_lp / ((5 + 2) / 6)]
    assert [h.score for h in hyps] == pytest.approx(expected)


def test_new_beam_may_take_one_beams_third_best_token() -> None:
    hyps = two_best(3, alpha=0.0)
    assert [h.tokens for h in hyps] == [[A], [A, B]]
    assert [h.log_prob for h in hyps] == pytest.approx([math.log(0.3), math.log(0.12)])


def test_eos_is_forced_at_each_sentences_own_budget() -> None:
    """Budget = src_len (a=1, b=0): 1 token for the first sentence, 3 for the second."""
    src, lengths = scripted_batch(1, 3)
    short, long = beam_search(
        ScriptedDecoder(),
        src,
        lengths,
        beam_size=2,
        nbest=2,
        alpha=0.0,
        bos_id=BOS,
        eos_id=EOS,
        max_len_a=1.0,
        max_len_b=0,
    )
    assert [h.tokens for h in short] == [[A], [B]]
    # The forced EOS keeps the model's own log-prob, it is not renormalised to 1.
    assert short[1].log_prob == pytest.approx(log_p(((), B), ((B,), EOS)))
    assert [h.tokens for h in long] == [[A], [B, B]]


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_zero_budget_gives_the_empty_hypothesis(search: str) -> None:
    src, lengths = scripted_batch(2)
    common = {"bos_id": BOS, "eos_id": EOS, "max_len_a": 0.0, "max_len_b": 0}
    if search == "greedy":
        [hyps] = greedy(ScriptedDecoder(), src, lengths, **common)
    else:
        [hyps] = beam_search(ScriptedDecoder(), src, lengths, beam_size=3, nbest=3, **common)
    assert len(hyps) == 1  # only one output exists, nbest cannot invent more
    assert hyps[0].tokens == []
    assert hyps[0].log_prob == pytest.approx(math.log(0.1))


@pytest.mark.parametrize("talkative_mates", [1, 4])
def test_done_sentence_ignores_longer_batch_mates(talkative_mates: int) -> None:
    """Once done, a sentence is frozen even though batch-mates keep the loop running,
    both when it leaves the batch at once (1 mate) and when it stays in it, frozen,
    because too few rows are done to be worth a smaller batch (4 mates)."""
    ids = {"bos_id": BOS, "eos_id": EOS}
    common = {"beam_size": 1, "alpha": 3.0, **ids}
    budget = {"max_len_a": 0.0, "max_len_b": 5}
    src, lengths = scripted_batch(1, table_ids=(2,))
    [[alone]] = beam_search(ScriptedDecoder(), src, lengths, **common, **budget)
    sizes = (1,) * (1 + talkative_mates)
    src, lengths = scripted_batch(*sizes, table_ids=(2,) + (1,) * talkative_mates)
    [[together], *talkative] = beam_search(ScriptedDecoder(), src, lengths, **common, **budget)
    assert alone.tokens == together.tokens == [A]
    assert together.score == pytest.approx(alone.score)
    assert all(hyp.tokens == [A] * 5 for [hyp] in talkative)
    [[g_alone]] = greedy(ScriptedDecoder(), *scripted_batch(1, table_ids=(2,)), **ids, **budget)
    [[g_together], *_] = greedy(ScriptedDecoder(), src, lengths, **ids, **budget)
    assert g_alone.tokens == g_together.tokens == [A]
    assert g_together.log_prob == pytest.approx(g_alone.log_prob)


def test_nbest_larger_than_beam_is_rejected() -> None:
    src, lengths = scripted_batch(2)
    with pytest.raises(ValueError, match=r"nbest=3.*beam_size=2"):
        beam_search(
            ScriptedDecoder(),
            src,
            lengths,
            beam_size=2,
            nbest=3,
            bos_id=BOS,
            eos_id=EOS,
            max_len_a=0.0,
            max_len_b=5,
        )


def test_inputs_are_not_mutated() -> None:
    src, lengths = scripted_batch(3, 1)
    src_copy, lengths_copy = src.clone(), lengths.clone()
    beam_search(
        ScriptedDecoder(),
        src,
        lengths,
        beam_size=2,
        bos_id=BOS,
        eos_id=EOS,
        max_len_a=1.0,
        max_len_b=2,
    )
    assert torch.equal(src, src_copy)
    assert torch.equal(lengths, lengths_copy)


# ------------------------------------------------------------------------------ toy RNN

TOY_BOS, TOY_EOS, TOY_VOCAB = 0, 3, 4  # three ordinary tokens (0, 1, 2) plus EOS


@dataclass
class ToyEncoderOutput:
    keys: Tensor  # (B, S, D)
    mask: Tensor  # (B, S) bool, True on real tokens

    def select(self, index: Tensor) -> ToyEncoderOutput:
        return ToyEncoderOutput(self.keys[index], self.mask[index])


@dataclass
class ToyState:
    hidden: Tensor  # (N, D)

    def select(self, index: Tensor) -> ToyState:
        return ToyState(self.hidden[index])


class ToyRNN(torch.nn.Module):
    """Embedding + GRU cell + dot attention over source embeddings, masked on padding."""

    def __init__(self, seed: int = 0, dim: int = 8) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = torch.nn.Embedding(TOY_VOCAB, dim)
            self.cell = torch.nn.GRUCell(2 * dim, dim)
            self.out = torch.nn.Linear(2 * dim, TOY_VOCAB)

    def encode(self, src: Tensor, src_lengths: Tensor) -> ToyEncoderOutput:
        mask = torch.arange(src.size(1))[None, :] < src_lengths[:, None]
        return ToyEncoderOutput(self.embed(src), mask)

    def init_state(self, enc: ToyEncoderOutput) -> ToyState:
        total = (enc.keys * enc.mask[:, :, None]).sum(dim=1)
        return ToyState(torch.tanh(total / enc.mask.sum(dim=1, keepdim=True)))

    def decode_step(
        self, prev: Tensor, state: ToyState, enc: ToyEncoderOutput
    ) -> tuple[Tensor, ToyState, Tensor]:
        energy = torch.einsum("nsd,nd->ns", enc.keys, state.hidden)
        attention = energy.masked_fill(~enc.mask, -math.inf).softmax(dim=-1)
        context = torch.einsum("ns,nsd->nd", attention, enc.keys)
        hidden = self.cell(torch.cat([self.embed(prev), context], dim=-1), state.hidden)
        logits = 2.0 * self.out(torch.cat([hidden, context], dim=-1))
        return logits.log_softmax(dim=-1), ToyState(hidden), attention

    def step(
        self, prev: Tensor, state: ToyState, enc: ToyEncoderOutput
    ) -> tuple[FullScores, ToyState, Tensor]:
        log_probs, state, attention = self.decode_step(prev, state, enc)
        return FullScores(log_probs), state, attention


def random_sentences(count: int, seed: int, max_len: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=g).tolist()
    return [torch.randint(0, TOY_VOCAB, (n,), generator=g).tolist() for n in lengths]


def pad(sentences: list[list[int]]) -> tuple[Tensor, Tensor]:
    """(B, S) source padded with EOS ids (masked anyway) and (B,) lengths."""
    width = max(len(s) for s in sentences)
    src = torch.tensor([s + [TOY_EOS] * (width - len(s)) for s in sentences])
    return src, torch.tensor([len(s) for s in sentences])


TOY_IDS = {"bos_id": TOY_BOS, "eos_id": TOY_EOS}


def test_beam_of_one_equals_greedy() -> None:
    model = ToyRNN(seed=1)
    src, lengths = pad(random_sentences(20, seed=2))
    budget = {"max_len_a": 1.5, "max_len_b": 2}
    greedy_hyps = greedy(model, src, lengths, **TOY_IDS, **budget)
    beam_hyps = beam_search(model, src, lengths, beam_size=1, alpha=1.0, **TOY_IDS, **budget)
    assert [h[0].tokens for h in beam_hyps] == [h[0].tokens for h in greedy_hyps]
    assert len({len(h[0].tokens) for h in greedy_hyps}) > 1  # not all cut at the budget
    for (g,), (b,) in zip(greedy_hyps, beam_hyps, strict=True):
        assert b.log_prob == pytest.approx(g.log_prob, rel=1e-5)


def exhaustive(model: ToyRNN, sentence: list[int], max_len: int) -> list[tuple[list[int], float]]:
    """Every output up to ``max_len`` tokens with its log-prob; EOS forced at ``max_len``."""
    src, lengths = pad([sentence])
    enc = model.encode(src, lengths)
    outputs: list[tuple[list[int], float]] = []

    def expand(prefix: list[int], prev: int, state: ToyState, total: float) -> None:
        logits, state, _ = model.decode_step(torch.tensor([prev]), state, enc)
        log_probs = torch.log_softmax(logits, dim=-1)
        outputs.append((prefix, total + float(log_probs[0, TOY_EOS])))
        if len(prefix) < max_len:
            for token in range(TOY_VOCAB):
                if token != TOY_EOS:
                    expand([*prefix, token], token, state, total + float(log_probs[0, token]))

    expand([], TOY_BOS, model.init_state(enc), 0.0)
    return outputs


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(alpha: float) -> None:
    model, max_len, nbest = ToyRNN(seed=3), 4, 5
    sentences = random_sentences(3, seed=4)
    src, lengths = pad(sentences)
    with torch.inference_mode():
        results = beam_search(
            model,
            src,
            lengths,
            beam_size=TOY_VOCAB**max_len,
            nbest=nbest,
            alpha=alpha,
            max_len_a=0.0,
            max_len_b=max_len,
            **TOY_IDS,
        )
        for sentence, hyps in zip(sentences, results, strict=True):
            outputs = exhaustive(model, sentence, max_len)
            assert len(outputs) == sum(3**n for n in range(max_len + 1))
            ranked = sorted(outputs, key=lambda o: -o[1] / length_penalty(len(o[0]) + 1, alpha))
            assert [h.tokens for h in hyps] == [tokens for tokens, _ in ranked[:nbest]]
            expected = [log_prob for _, log_prob in ranked[:nbest]]
            assert [h.log_prob for h in hyps] == pytest.approx(expected, rel=1e-5)


def translate_in_chunks(
    model: ToyRNN, sentences: list[list[int]], chunk: int, search: str
) -> list[list[Hypothesis]]:
    results = []
    for start in range(0, len(sentences), chunk):
        src, lengths = pad(sentences[start : start + chunk])
        common = {**TOY_IDS, "max_len_a": 1.5, "max_len_b": 2, "return_attention": True}
        if search == "greedy":
            results += greedy(model, src, lengths, **common)
        else:
            results += beam_search(model, src, lengths, beam_size=3, nbest=2, **common)
    return results


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_translation_does_not_depend_on_the_batch(search: str) -> None:
    model = ToyRNN(seed=5)
    sentences = random_sentences(7, seed=6)
    assert len({len(s) for s in sentences}) > 2
    reference = translate_in_chunks(model, sentences, len(sentences), search)
    for chunk in (1, 3):
        results = translate_in_chunks(model, sentences, chunk, search)
        for ref_hyps, hyps in zip(reference, results, strict=True):
            assert [h.tokens for h in hyps] == [h.tokens for h in ref_hyps]
            assert [h.score for h in hyps] == pytest.approx([h.score for h in ref_hyps], rel=1e-5)
            for hyp, ref in zip(hyps, ref_hyps, strict=True):
                assert hyp.attention is not None and ref.attention is not None
                torch.testing.assert_close(hyp.attention, ref.attention)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_attention_rows_cover_real_source_positions(search: str) -> None:
    model = ToyRNN(seed=7)
    sentences = random_sentences(5, seed=8)
    results = translate_in_chunks(model, sentences, len(sentences), search)
    for sentence, hyps in zip(sentences, results, strict=True):
        for hyp in hyps:
            assert hyp.attention is not None
            assert hyp.attention.shape == (len(hyp.tokens) + 1, len(sentence))
            assert hyp.attention.device.type == "cpu"
            torch.testing.assert_close(hyp.attention.sum(dim=1), torch.ones(len(hyp.tokens) + 1))


def test_attention_is_omitted_unless_requested() -> None:
    src, lengths = pad(random_sentences(2, seed=9))
    for hyps in beam_search(
        ToyRNN(), src, lengths, beam_size=2, nbest=2, **TOY_IDS, max_len_a=1.0, max_len_b=1
    ):
        assert all(h.attention is None for h in hyps)
