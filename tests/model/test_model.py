"""Model invariants: padding changes nothing, attention is a distribution over
real positions, and the teacher-forced pass equals step-by-step decoding."""

from __future__ import annotations

import pytest
import torch

from seq2seq.config import ModelConfig, TrainApp
from seq2seq.data.batching import collate
from seq2seq.data.tokenizer import PAD_ID
from seq2seq.model import bundle
from seq2seq.model.dropout import WordDropout
from seq2seq.model.loss import masked_cross_entropy
from seq2seq.model.model import Dropout, Seq2Seq
from tests.helpers import tiny_model

VARIANTS = [
    ("bahdanau", "gru"),
    ("luong", "gru"),
    ("none", "gru"),
    ("bahdanau", "lstm"),
    ("bahdanau", "rnn"),
]


def _pairs(tokenizer, pairs, n=5):
    src = tokenizer.encode_src([s for s, _ in pairs[:n]])
    tgt = tokenizer.encode_tgt([t for _, t in pairs[:n]])
    return list(zip(src, tgt, strict=True))


def _extra_padding(batch, extra):
    """The same batch with `extra` more pad columns on both sides."""

    def widen(t):
        return torch.cat([t, torch.full((t.size(0), extra), PAD_ID, dtype=t.dtype)], dim=1)

    return type(batch)(
        widen(batch.src), batch.src_lengths, widen(batch.tgt_in), widen(batch.tgt_out)
    )


@pytest.mark.parametrize(("attention", "cell"), VARIANTS)
def test_padding_changes_nothing(tokenizer, pairs, attention, cell):
    model = tiny_model(
        tokenizer, attention=attention, cell=cell, encoder_layers=2, decoder_layers=2
    )
    examples = _pairs(tokenizer, pairs)
    batch = collate(examples)
    wide = _extra_padding(batch, 6)
    with torch.no_grad():
        enc, enc_wide = (model.encode(b.src, b.src_lengths) for b in (batch, wide))
        S = batch.src.size(1)
        torch.testing.assert_close(enc_wide.states[:, :S], enc.states, atol=1e-6, rtol=1e-5)
        assert enc_wide.states[:, S:].abs().max() == 0
        logits, attn = model(batch.src, batch.src_lengths, batch.tgt_in)
        logits_w, attn_w = model(wide.src, wide.src_lengths, wide.tgt_in)
        T = batch.tgt_in.size(1)
        torch.testing.assert_close(attn_w[:, :T, :S], attn, atol=1e-6, rtol=1e-5)
        loss, n = masked_cross_entropy(logits, batch.tgt_out, pad_id=PAD_ID)
        loss_w, n_w = masked_cross_entropy(logits_w, wide.tgt_out, pad_id=PAD_ID)
    assert n == n_w
    torch.testing.assert_close(loss_w, loss, atol=1e-5, rtol=1e-5)
    # each sentence alone (no padding at all) gives the same encoder states
    for row, (src, _) in enumerate(examples):
        alone = model.encode(torch.tensor([src]), torch.tensor([len(src)]))
        torch.testing.assert_close(
            alone.states[0], enc.states[row, : len(src)], atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize(("attention", "cell"), VARIANTS)
def test_attention_is_a_distribution_over_real_positions(tokenizer, pairs, attention, cell):
    model = tiny_model(tokenizer, attention=attention, cell=cell)
    batch = collate(_pairs(tokenizer, pairs))
    with torch.no_grad():
        _, attn = model(batch.src, batch.src_lengths, batch.tgt_in)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:2]))
    padded = torch.arange(batch.src.size(1))[None, :] >= batch.src_lengths[:, None]
    assert attn.masked_select(padded[:, None, :].expand_as(attn)).abs().max() == 0


@pytest.mark.parametrize("decoder_layers", [1, 2])  # 1-layer GRU: seq2seq.model.gru's recurrence
@pytest.mark.parametrize(("attention", "cell"), VARIANTS)
def test_forward_equals_step_by_step_decoding(
    tokenizer, pairs, attention, cell, decoder_layers, device
):
    model = tiny_model(tokenizer, attention=attention, cell=cell, decoder_layers=decoder_layers)
    model.to(device)
    batch = collate(_pairs(tokenizer, pairs)).to(device)
    with torch.no_grad():
        logits, attn = model(batch.src, batch.src_lengths, batch.tgt_in)
        enc = model.encode(batch.src, batch.src_lengths)
        state = model.init_state(enc)
        steps, attns = [], []
        for t in range(batch.tgt_in.size(1)):
            step_logits, state, a = model.decode_step(batch.tgt_in[:, t], state, enc)
            steps.append(step_logits)
            attns.append(a)
    torch.testing.assert_close(torch.stack(steps, 1), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(attns, 1), attn, atol=1e-6, rtol=1e-5)


def test_state_select_reorders_rows(tokenizer, pairs):
    model = tiny_model(tokenizer, cell="lstm", decoder_layers=2)
    batch = collate(_pairs(tokenizer, pairs, n=3))
    enc = model.encode(batch.src, batch.src_lengths)
    state = model.init_state(enc)
    index = torch.tensor([2, 0, 0])
    picked = state.select(index)
    torch.testing.assert_close(picked.hidden, state.hidden[:, index])
    torch.testing.assert_close(picked.cell, state.cell[:, index])
    torch.testing.assert_close(enc.select(index).context, enc.context[index])


def test_tied_output_shares_the_target_embeddings(tokenizer):
    model = tiny_model(tokenizer)
    assert model.decoder.generator.weight is model.decoder.embed.weight


def test_shared_embeddings_are_one_table_and_survive_a_bundle(tmp_path, tokenizer):
    cfg = ModelConfig(embedding_size=8, hidden_size=16, attention_size=8, share_embeddings=True)
    vocab = tokenizer.tgt_vocab_size
    model = Seq2Seq.from_config(cfg, src_vocab=vocab, tgt_vocab=vocab, pad_id=PAD_ID)
    assert model.encoder.embed.weight is model.decoder.embed.weight
    assert model.decoder.generator.weight is model.decoder.embed.weight
    path = bundle.save(
        tmp_path / "b",
        model=model,
        config=TrainApp(model=cfg, run_dir="unused"),
        tokenizer=tokenizer,
        metrics=[],
    )
    loaded = bundle.load(path).model
    assert loaded.encoder.embed.weight is loaded.decoder.embed.weight
    torch.testing.assert_close(loaded.encoder.embed.weight, model.encoder.embed.weight)
    with pytest.raises(ValueError, match=r"tokenizer\.joint"):
        Seq2Seq.from_config(cfg, src_vocab=vocab, tgt_vocab=vocab + 1, pad_id=PAD_ID)


def test_bad_options_name_the_choices(tokenizer):
    with pytest.raises(ValueError, match="bahdanau, luong, none"):
        tiny_model(tokenizer, attention="dot")
    with pytest.raises(ValueError, match="even"):
        tiny_model(tokenizer, hidden_size=15)


def test_dropout_keeps_a_scaled_share_and_routes_gradients_through_it():
    torch.manual_seed(0)
    x = torch.rand(200, 50) + 1.0  # no zeros of its own
    x.requires_grad_()
    dropout = Dropout(0.3)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    assert torch.equal(dropout.eval()(x), x)


def test_word_dropout_drops_whole_tokens_and_only_in_training():
    torch.manual_seed(0)
    x = torch.rand(20, 100, 8) + 1.0  # no zeros of its own
    dropout = WordDropout(0.2)
    y = dropout(x)
    dropped = (y == 0).all(dim=-1)
    assert ((y == 0).any(dim=-1) == dropped).all()  # a token is dropped whole or kept whole
    assert abs(dropped.float().mean().item() - 0.2) < 0.03
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.8)
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(WordDropout(0.0)(x), x)


def test_word_dropout_leaves_evaluation_as_it_was():
    """Validation, translation and a bundle see the model without word dropout."""
    torch.manual_seed(0)
    sizes = {"embedding_size": 16, "hidden_size": 32, "attention_size": 16, "dropout": 0.0}
    plain = Seq2Seq(ModelConfig(**sizes), src_vocab=50, tgt_vocab=60, pad_id=PAD_ID)
    noisy = Seq2Seq(
        ModelConfig(**sizes, word_dropout=0.5), src_vocab=50, tgt_vocab=60, pad_id=PAD_ID
    )
    noisy.load_state_dict(plain.state_dict())  # no parameters of its own
    src, lengths = torch.randint(4, 50, (3, 7)), torch.tensor([7, 5, 2])
    tgt = torch.randint(4, 60, (3, 6))
    torch.testing.assert_close(
        noisy.eval()(src, lengths, tgt)[0], plain.eval()(src, lengths, tgt)[0]
    )
    torch.manual_seed(1)
    trained, _ = noisy.train()(src, lengths, tgt)
    assert not torch.allclose(trained, plain(src, lengths, tgt)[0])


def test_bf16_autocast_training_pass_gives_fp32_gradients_near_fp32():
    """The hand-written GRU and loss under bf16 autocast: every weight gets an
    fp32 gradient, and the loss stays close to the fp32 one."""
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=16, hidden_size=32, attention_size=16)
    model = Seq2Seq(cfg, src_vocab=50, tgt_vocab=60, pad_id=PAD_ID)
    model.eval()  # no dropout: both passes see the same function
    src, lengths = torch.randint(4, 50, (3, 7)), torch.tensor([7, 5, 2])
    tgt = torch.randint(4, 60, (3, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(src, lengths, tgt)
    loss, _ = masked_cross_entropy(logits, tgt, pad_id=PAD_ID, label_smoothing=0.1)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    logits, _ = model(src, lengths, tgt)
    reference, _ = masked_cross_entropy(logits, tgt, pad_id=PAD_ID, label_smoothing=0.1)
    assert abs(loss.item() - reference.item()) < 0.05 * reference.item()
