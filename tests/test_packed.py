"""Packed linear maps: the same function as ``F.linear``, row by row independent of
the batch, and plain ``F.linear`` where packing does not apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seq2seq.packed import Packed


def _weights(out: int = 48, inp: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(out, inp), torch.randn(out)


def test_matches_linear_with_and_without_bias():
    weight, bias = _weights()
    x = torch.randn(7, 24)
    torch.testing.assert_close(Packed(weight, bias)(x), F.linear(x, weight, bias))
    torch.testing.assert_close(Packed(weight)(x), F.linear(x, weight))


def test_a_rows_result_does_not_depend_on_its_batch():
    weight, bias = _weights(300, 64)
    linear = Packed(weight, bias)
    x = torch.randn(97, 64)
    whole = linear(x)
    one_by_one = torch.cat([linear(x[i : i + 1]) for i in range(x.size(0))])
    assert torch.equal(whole, one_by_one)
    assert torch.equal(whole[10:30], linear(x[10:30]))


def test_keeps_the_values_it_was_built_from():
    weight, bias = _weights()
    linear = Packed(weight, bias)
    x = torch.randn(3, 24)
    before = linear(x)
    weight.add_(1.0)  # a later update needs a new Packed, which search builds
    assert torch.equal(linear(x), before) or not torch.backends.mkldnn.is_available()


def test_other_dtypes_and_autocast_use_linear():
    weight, bias = _weights()
    x = torch.randn(5, 24)
    linear = Packed(weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear(x)
        expected = F.linear(x, weight, bias)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    double = Packed(weight.double(), bias.double())
    assert torch.equal(double(x.double()), F.linear(x.double(), weight.double(), bias.double()))
