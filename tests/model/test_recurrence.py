"""Both implementations of a one-layer GRU recurrence, forced in turn: the
hand-written loop and PyTorch's ``nn.GRU`` (cuDNN on CUDA) give the same states,
scores and gradients from the same parameters."""

from __future__ import annotations

import pytest
import torch

from seq2seq.config import ModelConfig, RnnImpl, TrainApp
from seq2seq.data.tokenizer import PAD_ID
from seq2seq.model import gru
from seq2seq.model.model import Seq2Seq
from seq2seq.training import rundir

IMPLS = (RnnImpl.handwritten, RnnImpl.torch)


def _model(impl: RnnImpl, device: torch.device, **options) -> Seq2Seq:
    torch.manual_seed(0)
    cfg = ModelConfig(
        embedding_size=6, hidden_size=8, attention_size=6, dropout=0.0, rnn_impl=impl, **options
    )
    model = Seq2Seq(cfg, src_vocab=30, tgt_vocab=40, pad_id=PAD_ID)
    return model.double().to(device)


def _batch(device: torch.device) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 3, 1, 5])
    src = torch.randint(4, 30, (4, 7), generator=generator)
    src[torch.arange(7)[None] >= lengths[:, None]] = PAD_ID
    tgt_in = torch.randint(4, 40, (4, 6), generator=generator)
    tgt_out = torch.randint(4, 40, (4, 6), generator=generator)
    tgt_out[2:, 4:] = PAD_ID
    return tuple(t.to(device) for t in (src, lengths, tgt_in, tgt_out))


def _loss_and_gradients(model: Seq2Seq, batch: tuple[torch.Tensor, ...]):
    loss, _ = model.loss(*batch, label_smoothing=0.1)
    names = [name for name, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("attention", ["bahdanau", "luong", "none"])
def test_both_implementations_give_the_same_loss_and_gradients(device, attention):
    batch = _batch(device)
    results = [
        _loss_and_gradients(_model(impl, device, attention=attention), batch) for impl in IMPLS
    ]
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], msg=name)
    # the recurrences really ran: every GRU weight has a gradient of its own
    assert grads_a["encoder.rnn.weight_hh_l0_reverse"].abs().sum() > 0
    assert grads_a["decoder.rnn.weight_hh_l0"].abs().sum() > 0


def test_both_implementations_encode_and_step_alike(device):
    """States on padding stay zero, and one decoder step (search's shape) agrees."""
    src, lengths, tgt_in, _ = _batch(device)
    encoded, stepped = [], []
    with torch.no_grad():
        for impl in IMPLS:
            model = _model(impl, device).eval()
            enc = model.encode(src, lengths)
            scores, state, attn = model.decode_step(tgt_in[:, 0], model.init_state(enc), enc)
            encoded.append(enc)
            stepped.append((scores, state.hidden, attn))
    padding = torch.arange(7, device=device)[None] >= lengths[:, None]
    for enc in encoded:
        assert enc.states[padding].abs().max() == 0
    torch.testing.assert_close(encoded[0].states, encoded[1].states)
    torch.testing.assert_close(encoded[0].context, encoded[1].context)
    for a, b in zip(*stepped, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_runs_either_implementation(device, impl):
    """Under bf16 autocast each path keeps one dtype through its recurrence and
    gives fp32 gradients."""
    model = _model(impl, device).float()
    src, lengths, tgt_in, tgt_out = _batch(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, _ = model.loss(src, lengths, tgt_in, tgt_out)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_auto_follows_the_measured_table_and_bad_names_list_the_choices(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setitem(gru.AUTO, "cuda", RnnImpl.torch)
    assert gru.recurrence_impl("auto", cuda) == RnnImpl.torch
    assert gru.recurrence_impl("auto", cpu) == gru.AUTO["cpu"]
    assert gru.recurrence_impl("auto", torch.device("meta")) == RnnImpl.handwritten
    assert gru.recurrence_impl("torch", cpu) == RnnImpl.torch
    assert gru.recurrence_impl(RnnImpl.handwritten, cuda) == RnnImpl.handwritten
    with pytest.raises(ValueError, match="auto, handwritten, torch"):
        Seq2Seq(ModelConfig(rnn_impl="cudnn"), src_vocab=9, tgt_vocab=9, pad_id=PAD_ID)  # type: ignore[arg-type]


def test_other_cells_always_run_through_the_module(device):
    """An LSTM or a two-layer GRU has no hand-written path: the setting changes nothing."""
    batch = _batch(device)
    for options in ({"cell": "lstm"}, {"cell": "gru", "decoder_layers": 2}):
        losses = [_loss_and_gradients(_model(impl, device, **options), batch)[0] for impl in IMPLS]
        assert torch.equal(losses[0], losses[1])


def test_a_run_resumes_under_another_implementation():
    """The setting changes no parameter, so a checkpoint does not protect it."""
    flat = rundir._flatten(TrainApp(run_dir="x", model=ModelConfig(rnn_impl=RnnImpl.torch)))
    assert "model.rnn_impl" in flat
    assert "model.rnn_impl" not in rundir.protected(flat)
    assert "model.hidden_size" in rundir.protected(flat)
