"""Joining the rows of two encoder outputs or decoder states of one model, for a
live batch (`seq2seq.decoding.live`) that new sentences enter while it runs.

The narrower part's source positions are padded (masked, so attention gives them no
weight and reads nothing from them), as a batch padded to its longest sentence is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from functools import singledispatch
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from seq2seq.decoding.ensemble import Members
from seq2seq.decoding.inference import SearchEncoding
from seq2seq.model.model import DecoderState, EncoderOutput

__all__ = ["MIN_WIDTH", "cat_rows", "grow", "join", "width_of"]

# A live batch keeps at least two source positions: then a read-out table one
# position wide can only belong to a model without attention (`_join_search_encoding`).
MIN_WIDTH = 2


@singledispatch
def join(a: Any, b: Any, width: int) -> Any:
    """Rows of ``a`` then rows of ``b`` (encoder outputs or decoder states of one
    model), source positions padded to ``width``."""
    raise TypeError(f"cannot join search state of type {type(a).__name__}")


def _pad_positions(x: Tensor, width: int, value: float | bool = 0) -> Tensor:
    """Right-pad dim 1 of ``x`` to ``width``."""
    extra = width - x.size(1)
    if extra <= 0:
        return x
    shape = (x.size(0), extra, *x.shape[2:])
    return torch.cat([x, x.new_full(shape, value)], dim=1)


@join.register
def _join_encoder_output(a: EncoderOutput, b: EncoderOutput, width: int) -> EncoderOutput:
    parts = {}
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name != "context":
            fill = False if f.name == "mask" else 0
            x, y = _pad_positions(x, width, fill), _pad_positions(y, width, fill)
        parts[f.name] = torch.cat([x, y])
    return EncoderOutput(**parts)


@join.register
def _join_search_encoding(a: SearchEncoding, b: SearchEncoding, width: int) -> SearchEncoding:
    # Without attention the read-out table is one position wide whatever the source.
    per_position = a.values.size(1) == a.source.states.size(1)
    va, vb = a.values, b.values
    if per_position:
        va, vb = _pad_positions(va, width), _pad_positions(vb, width)
    return SearchEncoding(
        join(a.source, b.source, width),
        torch.cat([a.context_gates, b.context_gates]),
        torch.cat([va, vb]),
    )


@join.register
def _join_decoder_state(a: DecoderState, b: DecoderState, width: int) -> DecoderState:
    cell = None
    if a.cell is not None and b.cell is not None:
        cell = torch.cat([a.cell, b.cell], dim=1)
    return DecoderState(torch.cat([a.hidden, b.hidden], dim=1), cell)


@join.register
def _join_members(a: Members, b: Members, width: int) -> Members:
    return Members(tuple(join(x, y, width) for x, y in zip(a.parts, b.parts, strict=True)))


def width_of(enc: Any) -> int:
    """Source positions of an encoder output."""
    if isinstance(enc, Members):
        return width_of(enc.parts[0])
    if isinstance(enc, SearchEncoding):
        return width_of(enc.source)
    return int(enc.mask.size(1))


def grow(x: Tensor, dim: int, size: int, value: float) -> Tensor:
    """``x`` right-padded along ``dim`` to at least ``size``."""
    extra = size - x.size(dim)
    if extra <= 0:
        return x
    return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, extra], value=value)


def cat_rows(a: Tensor | None, b: Tensor | None, dims: Sequence[int], fill: float) -> Any:
    """Rows of ``a`` then ``b``, each padded along ``dims`` to the larger of the two."""
    if a is None or b is None:
        return None
    for dim in dims:
        size = max(a.size(dim), b.size(dim))
        a, b = grow(a, dim, size, fill), grow(b, dim, size, fill)
    return torch.cat([a, b])
