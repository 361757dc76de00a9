"""Search's frozen view of a model computes the model's own step, for every variant."""

from __future__ import annotations

import pytest
import torch

from seq2seq.config import OptimConfig
from seq2seq.data.batching import collate
from seq2seq.decoding import inference
from seq2seq.training.optim import build_optimizer
from tests.helpers import tiny_model

VARIANTS = [
    ("bahdanau", "gru", 1),
    ("luong", "gru", 1),
    ("none", "gru", 1),
    ("bahdanau", "gru", 2),
    ("bahdanau", "lstm", 1),
    ("bahdanau", "rnn", 1),
]


def _batch(tokenizer, pairs, n=5):
    src = tokenizer.encode_src([s for s, _ in pairs[:n]])
    tgt = tokenizer.encode_tgt([t for _, t in pairs[:n]])
    return collate(list(zip(src, tgt, strict=True)))


def _stepped(searched, batch):
    """Every step's (N, V) log-probs and attention along the gold target."""
    enc = searched.encode(batch.src, batch.src_lengths)
    state, log_probs, attention = searched.init_state(enc), [], []
    for t in range(batch.tgt_in.size(1)):
        scores, state, attn = searched.step(batch.tgt_in[:, t], state, enc)
        log_probs.append(scores.log_probs())
        attention.append(attn)
    return torch.stack(log_probs, 1), torch.stack(attention, 1)


@pytest.mark.parametrize("softmax_head", [0, 10])
@pytest.mark.parametrize(("attention", "cell", "layers"), VARIANTS)
def test_search_steps_equal_the_teacher_forced_pass(
    tokenizer, pairs, attention, cell, layers, softmax_head
):
    model = tiny_model(
        tokenizer, attention=attention, cell=cell, decoder_layers=layers, softmax_head=softmax_head
    )
    with torch.no_grad():
        model.decoder.embed.weight.mul_(10.0)  # steps that differ from each other
    batch = _batch(tokenizer, pairs)
    with torch.no_grad():
        scores, attn = model(batch.src, batch.src_lengths, batch.tgt_in)
        log_probs, step_attn = _stepped(inference.build(model), batch)
    expected = torch.log_softmax(scores, dim=-1)
    torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_attn, attn, atol=1e-6, rtol=1e-5)


def test_one_layer_gru_reads_the_token_table(tokenizer):
    """Only the one-layer GRU has the precomputed step; other decoders use their own."""
    assert isinstance(inference.build(tiny_model(tokenizer)), inference.GRUInference)
    for options in ({"cell": "lstm"}, {"decoder_layers": 2}):
        assert isinstance(inference.build(tiny_model(tokenizer, **options)), inference.RNNInference)


def test_needs_the_model_in_eval_mode(tokenizer):
    with pytest.raises(ValueError, match="eval"):
        inference.build(tiny_model(tokenizer).train())


def test_one_built_after_a_training_step_follows_the_new_weights(tokenizer, pairs):
    """A fused optimiser updates the weights in place; a fresh inference object (what
    each validation builds) steps with the updated ones."""
    model = tiny_model(tokenizer)
    batch = _batch(tokenizer, pairs)
    with torch.no_grad():
        before, _ = _stepped(inference.build(model), batch)
    optimiser = build_optimizer(model, OptimConfig(lr=0.05))
    model.train()
    loss, _ = model.loss(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out)
    loss.backward()
    optimiser.step()
    model.eval()
    with torch.no_grad():
        after, _ = _stepped(inference.build(model), batch)
        scores, _ = model(batch.src, batch.src_lengths, batch.tgt_in)
    torch.testing.assert_close(after, torch.log_softmax(scores, -1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)
