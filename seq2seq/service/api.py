"""The HTTP API's request and response bodies (JSON), and the checks a request
passes before it is queued.

FastAPI turns these models into the OpenAPI schema at ``/docs``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from seq2seq.config import ServeApp
from seq2seq.decoding.translator import TextHypothesis
from seq2seq.service.errors import ServiceError
from seq2seq.service.guards import text_problem

__all__ = [
    "Attention",
    "BundleInfo",
    "DecodeKey",
    "Hypothesis",
    "ServiceError",
    "TranslateRequest",
    "TranslateResponse",
    "Translation",
]


@dataclass(frozen=True)
class DecodeKey:
    """The settings that must be equal for requests to share a batch."""

    beam_size: int
    nbest: int
    attention: bool


@dataclass(frozen=True)
class BundleInfo:
    """What ``/info`` and the page say about the model."""

    path: str
    sha256: str
    source_language: str
    target_language: str
    parameters: int


class TranslateRequest(BaseModel):
    """``POST /translate``: one line or a list of lines, and optional decoding settings."""

    model_config = ConfigDict(extra="forbid")

    q: StrictStr | list[StrictStr] = Field(description="a line, or a list of lines")
    beam_size: StrictInt | None = Field(None, ge=1, description="default: the server's")
    nbest: StrictInt | None = Field(None, ge=1, description="hypotheses per line, <= beam_size")
    attention: StrictBool = Field(False, description="return attention matrices")
    source: StrictStr | None = Field(None, description="if given, the model's source language")
    target: StrictStr | None = Field(None, description="if given, the model's target language")


class Hypothesis(BaseModel):
    text: str
    score: float


class Attention(BaseModel):
    """Attention of the best hypothesis: one row per target piece (EOS included),
    one column per source piece."""

    src_pieces: list[str]
    tgt_pieces: list[str]
    weights: list[list[float]]


class Translation(BaseModel):
    text: str = Field(description="the best translation; empty for an empty line")
    score: float = Field(description="its search score (0 for an empty line)")
    nbest: list[Hypothesis] | None = Field(None, description="when nbest > 1, best first")
    attention: Attention | None = Field(None, description="when attention is true")


class TranslateResponse(BaseModel):
    translations: list[Translation]
    beam_size: int
    nbest: int


def _translation(hyps: list[TextHypothesis], *, nbest: int, attention: bool) -> Translation:
    best = hyps[0] if hyps else None
    result = Translation(
        text=best.text if best else "",
        score=best.score if best else 0.0,
        nbest=None,
        attention=None,
    )
    if nbest > 1:
        result.nbest = [Hypothesis(text=h.text, score=h.score) for h in hyps]
    if attention:
        weights = best.attention if best is not None else None
        result.attention = Attention(
            src_pieces=list(best.src_pieces) if best else [],
            tgt_pieces=list(best.tgt_pieces) if best else [],
            weights=[[round(w, 4) for w in row] for row in weights.tolist()]
            if weights is not None
            else [],
        )
    return result


def _check_request(body: TranslateRequest, config: ServeApp, info: BundleInfo) -> list[str]:
    """The request's lines, after the limits; raises ServiceError naming the limit."""
    lines = [body.q] if isinstance(body.q, str) else body.q
    problem = text_problem(lines)
    if problem is not None:
        raise ServiceError(422, problem)
    if len(lines) > config.max_lines:
        raise ServiceError(
            413, f"q has {len(lines)} lines; the limit is max_lines={config.max_lines}"
        )
    for i, line in enumerate(lines):
        if len(line) > config.max_chars:
            raise ServiceError(
                413,
                f"line {i} of q has {len(line)} characters; "
                f"the limit is max_chars={config.max_chars}",
            )
    for name, asked, have in (
        ("source", body.source, info.source_language),
        ("target", body.target, info.target_language),
    ):
        if asked is not None and asked != have:
            raise ServiceError(
                422,
                f"{name}={asked!r}: this model translates "
                f"{info.source_language} -> {info.target_language}",
            )
    return lines


def _decode_key(body: TranslateRequest, config: ServeApp) -> DecodeKey:
    beam = body.beam_size if body.beam_size is not None else config.decode.beam_size
    nbest = body.nbest if body.nbest is not None else min(config.decode.nbest, beam)
    if beam > config.max_beam_size:
        raise ServiceError(
            422, f"beam_size={beam} is above the limit max_beam_size={config.max_beam_size}"
        )
    if nbest > beam:
        raise ServiceError(422, f"nbest={nbest} must be at most beam_size={beam}")
    return DecodeKey(beam_size=beam, nbest=nbest, attention=body.attention)
