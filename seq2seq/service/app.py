"""The translation service: a FastAPI app over a `Translator`, with dynamic batching.

Why a batcher: searching sentences one request at a time leaves most of the CPU
idle between small matrix products; searching what several clients sent together
costs little more than searching one sentence. Requests wait in one queue; whenever
one of ``workers`` search threads is free, the batcher takes the oldest request and
every waiting request with the same decoding settings (up to ``max_batch_sentences``
sentences and ``max_batch_tokens`` source words), once the batch is full, or the
clients the last search answered are back, or ``max_wait_ms`` after it ended, and
searches them as one call to
`Translator.hypotheses` on that thread, so the event loop keeps accepting and
rejecting requests meanwhile. Search treats every sentence independently of its
batch-mates, so batching never changes a translation.

Why bounded: the queue holds at most ``max_queue`` sentences; beyond it a request
is refused at once with 503 and ``Retry-After`` instead of waiting without end, and
a request that waits longer than ``timeout`` seconds gets 504. On shutdown the
batcher finishes every queued request before it stops.

The API (request and response bodies are JSON) is described by the pydantic models
below and served as OpenAPI at ``/docs``. Hydra stays in the app (`seq2seq.serve`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from seq2seq.config import ServeApp, validate
from seq2seq.decoding.translator import TextHypothesis, Translator
from seq2seq.model import bundle as bundle_io
from seq2seq.runtime import cores
from seq2seq.service.errors import install_error_handlers
from seq2seq.service.guards import Guard, text_problem
from seq2seq.service.page import install_page, render_page

__all__ = [
    "API_KEY_ENV",
    "Batcher",
    "BundleInfo",
    "check_config",
    "create_app",
    "describe_bundle",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "SEQ2SEQ_API_KEY"
RETRY_AFTER_SECONDS = 1


class ServiceError(Exception):
    """A request the service refuses, answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# ------------------------------------------------------------------------------- batcher


@dataclass(frozen=True)
class DecodeKey:
    """The settings that must be equal for requests to share a batch."""

    beam_size: int
    nbest: int
    attention: bool


@dataclass
class Job:
    """One request waiting for its lines' n-best lists."""

    lines: list[str]
    key: DecodeKey
    future: asyncio.Future[list[list[TextHypothesis]]]
    words: int
    arrived: float


@dataclass
class Stats:
    """Counters since start, shown at ``/info``."""

    requests: int = 0  # accepted into the queue
    sentences: int = 0  # searched
    batches: int = 0
    largest_batch: int = 0  # sentences
    rejected: int = 0  # 503: queue full or shutting down
    timed_out: int = 0  # 504
    search_seconds: float = 0.0  # summed over batches (several run at once)


def _words(lines: Sequence[str]) -> int:
    """Source size for the batch budget, counted without running the tokenizer."""
    return sum(len(line.split()) + 1 for line in lines)


class Batcher:
    """Collects waiting requests into batches and searches each on one of its search
    threads (see the module docstring)."""

    def __init__(self, translator: Translator, config: ServeApp) -> None:
        self._translator = translator
        self._config = config
        self._jobs: deque[Job] = deque()
        self._waiting = 0  # sentences in _jobs
        self._wake = asyncio.Event()
        self._workers = search_workers(config)
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="seq2seq-search")
        self._running: set[asyncio.Task[None]] = set()
        self._last_finish = -math.inf  # event-loop time the last search ended
        self._expected = 0  # sentences waiting then, plus those that search answered
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = Stats()

    @property
    def ready(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def waiting(self) -> int:
        """Sentences queued and not yet taken into a batch."""
        return self._waiting

    @property
    def searching(self) -> int:
        """Batches being searched now."""
        return len(self._running)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Refuse new requests, finish every queued one, then stop the search threads."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, lines: list[str], key: DecodeKey) -> list[list[TextHypothesis]]:
        """The n-best lists of ``lines``, once a batch holding them has been searched.

        Raises:
            ServiceError: 503 when the queue is full or the service is stopping,
                504 when no answer came within ``timeout`` seconds.
        """
        if self._closing or self._waiting + len(lines) > self._config.max_queue:
            self.stats.rejected += 1
            reason = "the service is shutting down" if self._closing else "the queue is full"
            raise ServiceError(
                503,
                f"{reason} (max_queue={self._config.max_queue} sentences); retry later",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        loop = asyncio.get_running_loop()
        job = Job(lines, key, loop.create_future(), _words(lines), loop.time())
        self._jobs.append(job)
        self._waiting += len(lines)
        self.stats.requests += 1
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self._config.timeout)
        except asyncio.TimeoutError:
            self._abandon(job)
            self.stats.timed_out += 1
            raise ServiceError(
                504, f"no translation within timeout={self._config.timeout:g} seconds"
            ) from None

    def _abandon(self, job: Job) -> None:
        """Drop a timed-out job that is still queued; a running one just finishes unread."""
        if job in self._jobs:
            self._jobs.remove(job)
            self._waiting -= len(job.lines)
        job.future.cancel()

    async def _run(self) -> None:
        """Whenever a search worker is free, collect a batch and start searching it.

        Why wait for a free worker before collecting: requests that arrive while all
        workers are busy join the next batch instead of starting small ones.
        """
        while self._jobs or not self._closing:
            if not self._jobs or len(self._running) >= self._workers:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._collect()
            if self._jobs:
                batch = self._take()
                task = asyncio.get_running_loop().create_task(self._search(batch))
                self._running.add(task)
                answered = sum(len(job.lines) for job in batch)
                task.add_done_callback(partial(self._finished, answered=answered))
        while self._running:
            await asyncio.wait(set(self._running))

    def _finished(self, task: asyncio.Task[None], answered: int) -> None:
        self._running.discard(task)
        self._last_finish = asyncio.get_running_loop().time()
        self._expected = self._waiting + answered
        self._wake.set()

    async def _collect(self) -> None:
        """Wait until the oldest job's batch is full, or the clients the last search
        answered have sent their next requests, or ``max_wait_ms`` after it ended.

        Why: a batch started at once would leave those clients to the following one,
        and batches would shrink to a fraction of the clients. A request reaching an
        idle service (the last search ended long ago) starts at once.
        """
        loop = asyncio.get_running_loop()
        deadline = self._last_finish + self._config.max_wait_ms / 1000
        while self._jobs and not self._closing and not self._full():
            if self._waiting >= self._expected:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _full(self) -> bool:
        key = self._jobs[0].key
        mates = [job for job in self._jobs if job.key == key]
        return (
            sum(len(job.lines) for job in mates) >= self._config.max_batch_sentences
            or sum(job.words for job in mates) >= self._config.max_batch_tokens
        )

    def _take(self) -> list[Job]:
        """The oldest job and, in arrival order, every job with its settings that fits."""
        first = self._jobs.popleft()
        batch, sentences, words = [first], len(first.lines), first.words
        for job in list(self._jobs):
            fits = (
                sentences + len(job.lines) <= self._config.max_batch_sentences
                and words + job.words <= self._config.max_batch_tokens
            )
            if job.key == first.key and fits:
                self._jobs.remove(job)
                batch.append(job)
                sentences, words = sentences + len(job.lines), words + job.words
        self._waiting -= sentences
        return batch

    async def _search(self, batch: list[Job]) -> None:
        """Search the batch's lines in one call on the worker thread; answer each job."""
        lines = [line for job in batch for line in job.lines]
        key = batch[0].key
        # workers=1: the service runs its batches side by side, one per search thread
        translator = self._translator.with_decode(
            beam_size=key.beam_size, nbest=key.nbest, workers=1
        )
        run = partial(_timed, translator.hypotheses, lines, attention=key.attention)
        try:
            found, seconds = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except Exception as e:  # a bug in search must fail its requests, not the worker
            logger.exception("search failed on a batch of %d lines", len(lines))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        self.stats.batches += 1
        self.stats.search_seconds += seconds
        self.stats.sentences += len(lines)
        self.stats.largest_batch = max(self.stats.largest_batch, len(lines))
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(found[start : start + len(job.lines)])
            start += len(job.lines)


def _timed(
    search: Callable[..., list[list[TextHypothesis]]], lines: list[str], *, attention: bool
) -> tuple[list[list[TextHypothesis]], float]:
    start = time.perf_counter()
    found = search(lines, attention=attention)
    return found, time.perf_counter() - start


def search_workers(config: ServeApp) -> int:
    """Batches searched at once: ``config.workers``, or one per CPU core."""
    return config.workers or cores()


# --------------------------------------------------------------------------- API models


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


# --------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class BundleInfo:
    """What ``/info`` and the page say about the model."""

    path: str
    sha256: str
    source_language: str
    target_language: str
    parameters: int


def describe_bundle(path: str | Path, translator: Translator) -> BundleInfo:
    """Languages from the bundle's config; a hash over its weight files, so clients
    can tell which model answered."""
    root = bundle_io.resolve(path)
    config = bundle_io.load_config(root)
    digest = hashlib.sha256()
    for weights in sorted(root.rglob("*.safetensors")):
        digest.update(weights.relative_to(root).as_posix().encode())
        digest.update(weights.read_bytes())
    return BundleInfo(
        path=str(root),
        sha256=digest.hexdigest(),
        source_language=config.data.src_lang,
        target_language=config.data.tgt_lang,
        parameters=sum(p.numel() for p in translator.model.parameters()),
    )


def _validation_message(error: RequestValidationError) -> str:
    """One readable sentence for pydantic's list of problems.

    ``q`` is a union (a string or a list of strings); pydantic reports each branch
    with its type name in the location, which is dropped here.
    """
    problems: list[tuple[list[str], Any]] = []
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p not in ("body", "str", "list[str]")]
        problems.append((loc, item))
    deeper = any(loc[:1] == ["q"] and len(loc) > 1 for loc, _ in problems)
    parts: list[str] = []
    for loc, item in problems:
        kind = item.get("type")
        if kind == "json_invalid":
            message = f"malformed JSON at character {loc[0] if loc else '?'}"
        elif kind == "model_attributes_type" and not loc:
            message = (
                'the body must be a JSON object such as {"q": "text"}, '
                "sent with Content-Type: application/json"
            )
        elif loc == ["q"] and kind in ("string_type", "list_type"):
            if deeper:
                continue
            message = "q: must be a string or a list of strings"
        else:
            message = f"{'.'.join(loc) or 'body'}: {item.get('msg', 'invalid')}"
        if message not in parts:
            parts.append(message)
    return "invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, e: ServiceError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        detail = [
            {k: v for k, v in item.items() if k in ("loc", "msg", "type")} for item in e.errors()
        ]
        return JSONResponse({"error": _validation_message(e), "detail": detail}, status_code=422)


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


def check_config(config: ServeApp) -> None:
    """Fail at start, naming the key, when a limit or batching setting cannot work."""
    validate(config)  # the ranges table: NaN, infinities, out-of-range ports
    for name in ("max_batch_sentences", "max_batch_tokens", "max_queue", "max_lines"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)}; it must be at least 1")
    for name in ("max_chars", "max_body_bytes", "timeout"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name}={getattr(config, name)}; it must be positive")
    if config.workers < 0:
        raise ValueError(f"workers={config.workers}; use 0 for one per CPU core")
    if config.max_wait_ms < 0:
        raise ValueError(f"max_wait_ms={config.max_wait_ms}; it must be 0 or more")
    if config.max_beam_size < config.decode.beam_size:
        raise ValueError(
            f"max_beam_size={config.max_beam_size} is below "
            f"decode.beam_size={config.decode.beam_size}; raise max_beam_size"
        )


def create_app(translator: Translator, config: ServeApp, info: BundleInfo) -> FastAPI:
    """The FastAPI app: routes, guards (key, body limits), the page, error answers
    and the batcher's life cycle.

    The key is ``config.api_key``, else the ``SEQ2SEQ_API_KEY`` environment variable.
    """
    check_config(config)
    key = config.api_key or os.environ.get(API_KEY_ENV) or None
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["batcher"] = batcher = Batcher(translator, config)
        batcher.start()
        yield
        await batcher.close()

    # Swagger UI and ReDoc from files shipped in the package, not from a CDN.
    app: FastAPI = FastAPIOffline(
        title="seq2seq translation service",
        lifespan=lifespan,
        static_url="/docs-assets",
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.add_middleware(
        Guard, key=key, limit=config.max_body_bytes, body_timeout=config.body_timeout
    )
    install_error_handlers(app)
    _install_error_handlers(app)
    install_page(
        app,
        render_page(
            source=info.source_language,
            target=info.target_language,
            beam_size=config.decode.beam_size,
            max_beam_size=config.max_beam_size,
            needs_key=bool(key),
        ),
    )
    started = time.time()

    @app.post("/translate", response_model=TranslateResponse)
    async def translate(body: TranslateRequest) -> Any:
        """Translate ``q``; one translation per line, in order."""
        lines = _check_request(body, config, info)
        decode = _decode_key(body, config)
        found = await state["batcher"].submit(lines, decode)
        translations = [
            _translation(hyps, nbest=decode.nbest, attention=decode.attention) for hyps in found
        ]
        response = TranslateResponse(
            translations=translations, beam_size=decode.beam_size, nbest=decode.nbest
        )
        return JSONResponse(response.model_dump(exclude_none=True))

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded and requests are accepted (503 while stopping)."""
        batcher = state.get("batcher")
        if batcher is None or not batcher.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/info")
    async def describe() -> dict[str, Any]:
        """The model, decoding defaults, limits, batching settings and counters."""
        batcher = state.get("batcher")
        return _info(info, config, batcher, uptime=time.time() - started)

    return app


def _info(
    info: BundleInfo, config: ServeApp, batcher: Batcher | None, *, uptime: float
) -> dict[str, Any]:
    decode = config.decode
    names = ("beam_size", "nbest", "alpha", "max_len_a", "max_len_b", "max_input_tokens")
    return {
        **asdict(info),
        "decode": {name: getattr(decode, name) for name in names},
        "limits": {
            name: getattr(config, name)
            for name in ("max_chars", "max_lines", "max_body_bytes", "max_beam_size", "timeout")
        },
        "batching": {
            name: getattr(config, name)
            for name in ("max_batch_sentences", "max_batch_tokens", "max_wait_ms", "max_queue")
        }
        | {"workers": search_workers(config)},
        "stats": {
            **asdict(batcher.stats if batcher else Stats()),
            "search_seconds": round(batcher.stats.search_seconds if batcher else 0.0, 2),
            "waiting": batcher.waiting if batcher else 0,
            "searching": batcher.searching if batcher else 0,
            "uptime_seconds": round(uptime, 1),
            "cpu_seconds": round(time.process_time(), 2),  # this process, all threads
        },
    }
