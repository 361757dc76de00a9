"""The sigmoid form of the additive score against Bahdanau's tanh form."""

from __future__ import annotations

import pytest
import torch

from seq2seq.model.additive import additive_scores


def _inputs(batch: int = 3, steps: int = 4, source: int = 5, size: int = 6):
    torch.manual_seed(0)
    keys = torch.randn(batch, source, size, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(batch, steps, size, dtype=torch.float64, requires_grad=True)
    v = torch.randn(size, dtype=torch.float64, requires_grad=True)
    return keys, queries, v


def _sigmoid_scores(keys: torch.Tensor, queries: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``additive_scores`` of undoubled projections, as attention calls it."""
    return additive_scores(2 * keys, 2 * queries, v)


def _tanh_scores(keys: torch.Tensor, queries: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(keys[:, None] + queries[:, :, None]) * v).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scores_differ_from_the_tanh_form_by_a_constant(dtype):
    """In training's and decoding's dtypes too, to their precision."""
    keys, queries, v = (t.detach().to(dtype) for t in _inputs())
    shift = _sigmoid_scores(keys, queries, v).double() - _tanh_scores(keys, queries, v).double()
    atol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(shift, v.sum().double().expand_as(shift), atol=atol, rtol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_scores_without_a_graph_equal_those_with_one(autocast):
    """Search and validation (fp32, no graph) take a path of their own: the same
    scores as training's, in fp32 even when bf16 autocast is on around it."""
    keys, queries, v = (t.detach().float() for t in _inputs())
    with_graph = additive_scores(keys, queries, v)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        without = additive_scores(keys, queries, v)
    assert without.dtype == torch.float32
    torch.testing.assert_close(without, with_graph)


def test_weights_and_gradients_match_the_tanh_form():
    """Through the softmax over keys (as attention uses it) both forms agree in
    the weights and in the gradient of every input."""
    keys, queries, v = _inputs()
    readout = torch.randn(3, 4, 5, dtype=torch.float64)  # a loss that weighs every weight
    results = []
    for scores in (_tanh_scores, _sigmoid_scores):
        weights = torch.softmax(scores(keys, queries, v), dim=-1)
        grads = torch.autograd.grad((weights * readout).sum(), [keys, queries, v])
        results.append((weights, *grads))
    for name, a, b in zip(["weights", "keys", "queries", "v"], *results, strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("needed", [(True, False, False), (False, True, True)])
def test_only_the_needed_gradients_are_returned(needed):
    inputs = zip(_inputs(), needed, strict=True)
    keys, queries, v = (t.detach().requires_grad_(n) for t, n in inputs)
    upstream = torch.randn(3, 4, 5, dtype=torch.float64)
    (additive_scores(keys, queries, v) * upstream).sum().backward()
    expected = [t.detach().clone().requires_grad_() for t in (keys, queries, v)]
    (additive_scores(*expected) * upstream).sum().backward()
    for tensor, reference, need in zip((keys, queries, v), expected, needed, strict=True):
        assert (tensor.grad is not None) == need
        if need:
            torch.testing.assert_close(tensor.grad, reference.grad)


def test_a_second_backward_raises_instead_of_returning_wrong_gradients():
    """The backward reuses its saved tensor in place, so it must not run twice."""
    scores = additive_scores(*_inputs()).sum()
    scores.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.backward()
