"""The two-level softmax: a normalised distribution over every piece, and a
training loss that is exactly its negative log-likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seq2seq.data.batching import collate
from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from seq2seq.decoding import inference
from seq2seq.decoding.beam import beam_search
from seq2seq.decoding.search import greedy, next_tokens
from seq2seq.model import softmax
from seq2seq.model.loss import masked_cross_entropy
from tests.helpers import lively_model, tiny_model

VOCAB, HEAD, WIDTH = 11, 4, 5


def _layers(dtype: torch.dtype = torch.float32) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    return nn.Linear(WIDTH, VOCAB).to(dtype), nn.Linear(WIDTH, 1).to(dtype)


def test_log_probs_by_hand():
    generator, tail = _layers()
    hidden = torch.randn(3, WIDTH)
    got = softmax.log_probs(hidden, generator, tail, HEAD)
    scores = generator(hidden)
    head = torch.softmax(torch.cat([scores[:, :HEAD], tail(hidden)], 1), 1)
    inside_tail = torch.softmax(scores[:, HEAD:], 1)
    by_hand = torch.cat([head[:, :HEAD], head[:, HEAD:] * inside_tail], 1)
    torch.testing.assert_close(got.exp(), by_hand)
    torch.testing.assert_close(got.exp().sum(1), torch.ones(3))


def test_loss_without_smoothing_is_the_negative_log_likelihood_of_log_probs():
    """What training minimises is what search reads, and padding counts nothing."""
    generator, tail = _layers(torch.float64)
    hidden = torch.randn(2, 4, WIDTH, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1, 7, 3, 10], [9, 2, PAD_ID, PAD_ID]])  # head and tail pieces
    loss, n = softmax.loss(hidden, target, generator=generator, tail=tail, head=HEAD, pad_id=PAD_ID)
    reference, n_ref = masked_cross_entropy(
        softmax.log_probs(hidden, generator, tail, HEAD).double(), target, pad_id=PAD_ID
    )
    assert n == n_ref == 6
    torch.testing.assert_close(loss, reference)
    params = [hidden, generator.weight, generator.bias, tail.weight, tail.bias]
    for ours, theirs in zip(
        torch.autograd.grad(loss, params), torch.autograd.grad(reference, params), strict=True
    ):
        torch.testing.assert_close(ours, theirs)


def test_label_smoothing_applies_within_each_level():
    eps = 0.1
    generator, tail = _layers()
    hidden = torch.randn(1, 2, WIDTH)
    target = torch.tensor([[2, 8]])  # a head piece, then a tail piece
    loss, _ = softmax.loss(
        hidden,
        target,
        generator=generator,
        tail=tail,
        head=HEAD,
        pad_id=PAD_ID,
        label_smoothing=eps,
    )
    scores = generator(hidden[0])
    head_lp = torch.log_softmax(torch.cat([scores[:, :HEAD], tail(hidden[0])], 1), 1)
    tail_lp = torch.log_softmax(scores[1, HEAD:], 0)

    def smoothed(lp: torch.Tensor, gold: int) -> float:
        return (1 - eps) * -lp[gold].item() + eps * -lp.mean().item()

    by_hand = smoothed(head_lp[0], 2) + smoothed(head_lp[1], HEAD) + smoothed(tail_lp, 8 - HEAD)
    assert math.isclose(loss.item(), by_hand, rel_tol=1e-5)


def test_a_batch_without_tail_targets_gives_the_tail_no_gradient():
    generator, tail = _layers()
    hidden = torch.randn(1, 3, WIDTH)
    loss, _ = softmax.loss(
        hidden, torch.tensor([[1, 2, 3]]), generator=generator, tail=tail, head=HEAD, pad_id=0
    )
    loss.backward()
    assert generator.weight.grad[HEAD:].abs().sum() == 0
    assert tail.weight.grad.abs().sum() > 0  # the tail class is still pushed down


def test_model_scores_and_training_loss_agree(tokenizer, pairs):
    """The teacher-forced scores equal step-by-step decoding, are log-probabilities,
    and the model's training loss is their masked negative log-likelihood."""
    model = tiny_model(tokenizer, softmax_head=10)
    examples = list(
        zip(
            tokenizer.encode_src([s for s, _ in pairs[:4]]),
            tokenizer.encode_tgt([t for _, t in pairs[:4]]),
            strict=True,
        )
    )
    batch = collate(examples)
    with torch.no_grad():
        scores, _ = model(batch.src, batch.src_lengths, batch.tgt_in)
        enc = model.encode(batch.src, batch.src_lengths)
        state, steps = model.init_state(enc), []
        for t in range(batch.tgt_in.size(1)):
            step, state, _ = model.decode_step(batch.tgt_in[:, t], state, enc)
            steps.append(step)
        loss, n = model.loss(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out)
    torch.testing.assert_close(torch.stack(steps, 1), scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(scores.shape[:2]))
    assert (batch.tgt_out >= 10).any(), "the batch must reach the tail"
    reference, n_ref = masked_cross_entropy(scores, batch.tgt_out, pad_id=PAD_ID)
    assert n == n_ref
    torch.testing.assert_close(loss, reference, atol=1e-4, rtol=1e-5)


def test_head_must_leave_a_tail(tokenizer):
    with pytest.raises(ValueError, match=r"model\.softmax_head"):
        tiny_model(tokenizer, softmax_head=tokenizer.tgt_vocab_size)


class _Stepped:
    """A `Searchable` whose single step scores the given vectors through ``make``."""

    def __init__(self, make):
        self.make = make

    def step(self, prev, state, enc):
        return self.make(), state, torch.zeros(prev.size(0), 1)


def _next(scores, width, must_end, eos, beam_scores=None):
    rows = must_end.numel()
    return next_tokens(
        _Stepped(lambda: scores),
        torch.zeros(rows, dtype=torch.long),
        None,
        None,
        width=width,
        must_end=must_end,
        eos_id=eos,
        beam_scores=beam_scores,
    )[:2]


@pytest.mark.parametrize("width", [1, 3])
def test_greedy_reads_the_best_pieces_of_log_probs_and_obeys_must_end(width):
    generator, tail = _layers()
    with torch.no_grad():
        tail.bias.fill_(1.5)  # the tail class is likely: some rows need the tail
    hidden = torch.randn(64, WIDTH)
    must_end = torch.zeros(64, dtype=torch.bool)
    must_end[::7] = True
    eos = 2
    with torch.no_grad():
        two_level = softmax.TwoLevelScores(hidden, generator, tail, HEAD)
        scores, pieces = _next(two_level, width, must_end, eos)
        full = softmax.log_probs(hidden, generator, tail, HEAD)
    expected_scores, expected_pieces = full.topk(width, dim=-1)
    free = ~must_end
    assert torch.equal(pieces[free], expected_pieces[free])
    torch.testing.assert_close(scores[free], expected_scores[free])
    assert (pieces[must_end, 0] == eos).all()
    torch.testing.assert_close(scores[must_end, 0], full[must_end, eos])
    assert (scores[must_end, 1:] == float("-inf")).all()
    from_tail = (pieces[free] >= HEAD).any(-1)
    assert from_tail.any() and not from_tail.all()


@pytest.mark.parametrize("k", [1, 3])
def test_beam_reads_exactly_what_full_scores_give(k):
    """Beam search reads each sentence's best ``keep`` non-EOS (beam score + log-prob)
    sums and every EOS sum above them: those must be exactly the sums over the full
    distribution, although rows far behind their group skip the tail."""
    generator, tail = _layers()
    eos = 2
    with torch.no_grad():
        tail.bias.fill_(1.0)
        generator.bias[HEAD] += 6.0  # one tail piece takes almost all the tail's mass
        generator.bias[eos] += 1.5  # and EOS often ranks near the top
    groups, width, keep = 300, k + 1, k
    torch.manual_seed(1)
    hidden = torch.randn(groups * k, WIDTH)
    offsets = -3 * torch.rand(groups, k)
    offsets[::5, 1:] = float("-inf")  # sentences with one live beam, as at the first step
    must_end = torch.zeros(groups * k, dtype=torch.bool)
    with torch.no_grad():
        two_level = softmax.TwoLevelScores(hidden, generator, tail, HEAD)
        scores, pieces = _next(two_level, width, must_end, eos, beam_scores=offsets)
        full_scores, full_pieces = softmax.log_probs(hidden, generator, tail, HEAD).topk(width)

    def read(row_scores: torch.Tensor, row_pieces: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per group, best first: the sums and pieces that search reads, -inf / -1 after."""
        sums = (offsets[:, :, None] + row_scores.view(groups, k, -1)).view(groups, -1)
        ids = row_pieces.view(groups, -1)
        floor = sums.masked_fill(ids == eos, float("-inf")).topk(keep, dim=1).values[:, -1:]
        sums, order = sums.sort(dim=1, descending=True)
        unread = sums < floor
        return sums.masked_fill(unread, float("-inf")), ids.gather(1, order).masked_fill(unread, -1)

    got_sums, got_ids = read(scores, pieces)
    want_sums, want_ids = read(full_scores, full_pieces)
    torch.testing.assert_close(got_sums, want_sums)
    assert torch.equal(got_ids, want_ids)
    assert (want_ids == eos).any() and (want_ids >= HEAD).any()  # both cases are read
    if k > 1:  # some rows behind their group skipped the tail
        assert not torch.equal(pieces, full_pieces)


@pytest.mark.parametrize(("eos", "width"), [(HEAD + 1, 2), (1, HEAD + 2)])
def test_eos_in_the_tail_or_a_width_beyond_the_head_ranks_every_piece(eos, width):
    generator, tail = _layers()
    hidden = torch.randn(20, WIDTH)
    must_end = torch.zeros(20, dtype=torch.bool)
    must_end[::3] = True
    with torch.no_grad():
        two_level = softmax.TwoLevelScores(hidden, generator, tail, HEAD)
        scores, pieces = _next(two_level, width, must_end, eos)
        full = softmax.log_probs(hidden, generator, tail, HEAD)
    free = ~must_end
    expected_scores, expected_pieces = full.topk(width, dim=-1)
    assert torch.equal(pieces[free], expected_pieces[free])
    torch.testing.assert_close(scores[free], expected_scores[free])
    assert (pieces[must_end, 0] == eos).all()
    torch.testing.assert_close(scores[must_end, 0], full[must_end, eos])


def test_scores_for_search_are_the_distribution_of_log_probs():
    generator, tail = _layers()
    hidden = torch.randn(6, WIDTH)
    with torch.no_grad():
        two_level = softmax.TwoLevelScores(hidden, generator, tail, HEAD)
        full = softmax.log_probs(hidden, generator, tail, HEAD)
        torch.testing.assert_close(two_level.log_probs(), full)
        for token in (0, HEAD - 1, HEAD, VOCAB - 1):
            torch.testing.assert_close(two_level.log_prob(token), full[:, token])
        bound = two_level.tail_bound()
        assert (full[:, HEAD:] <= bound[:, None] + 1e-6).all()
        rows = torch.tensor([4, 1])
        tail_scores, tail_pieces = two_level.tail(rows, 3)
        expected = full[rows, HEAD:].topk(3, dim=-1)
        torch.testing.assert_close(tail_scores, expected.values)
        assert torch.equal(tail_pieces, expected.indices + HEAD)
        one_level = softmax.FullScores(hidden, generator)
        logits = generator(hidden).log_softmax(-1)
        torch.testing.assert_close(one_level.log_probs(), logits)
        best, ids = one_level.head(3)
        torch.testing.assert_close(best, logits.topk(3).values)
        assert torch.equal(ids, logits.topk(3).indices)
        assert one_level.tail_bound() is None


class _FullScoresOnly:
    """The same model seen through its full scores: search ranks every piece."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.searched = inference.build(model)
        self.encode, self.init_state = self.searched.encode, self.searched.init_state

    def step(self, prev, state, enc):
        scores, state, attn = self.searched.step(prev, state, enc)
        return softmax.FullScores(scores.log_probs()), state, attn


@pytest.mark.parametrize("beam", [1, 5])
def test_pruned_search_equals_search_over_full_scores(tokenizer, pairs, beam):
    """Search skips the tail where it cannot matter: the same outputs."""
    model = lively_model(tokenizer, softmax_head=10, seed=4)
    with torch.no_grad():  # measured: then search picks from both levels
        model.decoder.tail.bias.add_(4.5)
    src = tokenizer.encode_src([s for s, _ in pairs[:12]])
    batch = collate([(s, [5]) for s in src])
    ids = {"bos_id": BOS_ID, "eos_id": EOS_ID, "max_len_a": 1.2, "max_len_b": 3}
    outputs = []
    for searched in (inference.build(model), _FullScoresOnly(model)):
        if beam == 1:
            hyps = greedy(searched, batch.src, batch.src_lengths, **ids)
        else:
            hyps = beam_search(
                searched, batch.src, batch.src_lengths, beam_size=beam, nbest=beam, **ids
            )
        outputs.append([[(h.tokens, h.log_prob) for h in nbest] for nbest in hyps])
    pruned, full = outputs
    assert [[t for t, _ in n] for n in pruned] == [[t for t, _ in n] for n in full]
    for n_pruned, n_full in zip(pruned, full, strict=True):
        assert [p for _, p in n_pruned] == pytest.approx([p for _, p in n_full], rel=1e-4)
    chosen = [t for n in pruned for tokens, _ in n for t in tokens]
    assert any(t >= 10 for t in chosen) and any(t < 10 for t in chosen)
