"""Search on the test device (``SEQ2SEQ_TEST_DEVICE``): the same hypotheses as on the
CPU, handed back on the CPU, attention included."""

from __future__ import annotations

import pytest
import torch

from seq2seq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from seq2seq.decoding import inference, search
from seq2seq.decoding.beam import beam_search
from seq2seq.decoding.search import greedy
from tests.helpers import lively_model

SOURCES = [[5, 9, 14, 7, 22], [31, 8], [12, 40, 17, 6, 3, 19, 25], [44]]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in SOURCES])
    src = torch.full((len(SOURCES), int(lengths.max())), PAD_ID)
    for row, ids in enumerate(SOURCES):
        src[row, : len(ids)] = torch.tensor(ids)
    return src, lengths


@pytest.mark.parametrize("softmax_head", [0, 30])
@pytest.mark.parametrize("beam", [1, 4])
def test_search_on_the_device_gives_the_cpus_hypotheses(
    tokenizer: Tokenizer, device: torch.device, beam: int, softmax_head: int
) -> None:
    src, lengths = _batch()
    found = {}
    for where in (torch.device("cpu"), device):
        model = inference.build(lively_model(tokenizer, softmax_head=softmax_head).to(where).eval())
        budget = {"bos_id": BOS_ID, "eos_id": EOS_ID, "max_len_a": 1.0, "max_len_b": 3}
        args = (model, src.to(where), lengths.to(where))
        if beam == 1:
            found[where.type] = greedy(*args, return_attention=True, **budget)
        else:
            found[where.type] = beam_search(*args, beam_size=beam, return_attention=True, **budget)
    for ours, theirs, src_len in zip(found[device.type], found["cpu"], lengths, strict=True):
        [hyp], [ref] = ours, theirs
        assert hyp.tokens == ref.tokens
        assert hyp.score == pytest.approx(ref.score, rel=1e-4, abs=1e-4)
        assert hyp.attention is not None and ref.attention is not None
        assert hyp.attention.device.type == "cpu"
        assert hyp.attention.shape == (len(hyp.tokens) + 1, int(src_len))
        torch.testing.assert_close(hyp.attention, ref.attention, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hyp.attention.sum(-1), torch.ones(len(hyp.tokens) + 1))


@pytest.mark.parametrize("width", [1, 6])
def test_both_ways_of_forcing_eos_agree(width: int) -> None:
    """The GPU's sync-free rule gives what the CPU's row rewrite gives."""
    gen = torch.Generator().manual_seed(width)
    best = torch.randn(40, width, generator=gen).sort(dim=1, descending=True).values
    tokens = torch.randint(4, 100, (40, width), generator=gen)
    must_end = torch.rand(40, generator=gen) < 0.3
    eos_log_probs = torch.randn(40, generator=gen)
    selected = search._force_eos_selecting(best, tokens, must_end, eos_log_probs, EOS_ID)
    rewritten = search._force_eos(best.clone(), tokens.clone(), must_end, eos_log_probs, EOS_ID)
    assert must_end.any() and not must_end.all()
    for a, b in zip(selected, rewritten, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(selected[1][must_end, 0], torch.full((int(must_end.sum()),), EOS_ID))
    assert torch.equal(selected[0][~must_end], best[~must_end])
