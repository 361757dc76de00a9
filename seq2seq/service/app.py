"""The translation service: a FastAPI app over a `Translator` and its `Batcher`.

The scheduler lives in `seq2seq.service.batcher`, the request and response bodies
and the checks a request passes in `seq2seq.service.api`; this module holds the web
plumbing: routes, the body limit, the API key, error answers and the page. The API
(request and response bodies are JSON) is served as OpenAPI at ``/docs``. Hydra
stays in the app (`seq2seq.serve`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from seq2seq.config import ServeApp
from seq2seq.decoding.translator import Translator
from seq2seq.model import bundle as bundle_io
from seq2seq.service.admission import QueueGate
from seq2seq.service.api import (
    BundleInfo,
    ServiceError,
    TranslateRequest,
    TranslateResponse,
    _check_request,
    _decode_key,
    _translation,
)
from seq2seq.service.batcher import Batcher, Stats, search_workers
from seq2seq.service.metrics import CONTENT_TYPE, RequestCounter, ServiceMetrics

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
PAGE = "static/index.html"


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


class BodyLimit:
    """Refuse a request body over ``limit`` bytes before reading it (413), and one
    without a declared length (411), whose size could not be checked up front."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope["headers"]).get(b"content-length")
            refusal = None
            if length is None or not length.isdigit():
                refusal = (411, "the request needs a Content-Length header")
            elif int(length) > self.limit:
                refusal = (
                    413,
                    f"the request body has {int(length)} bytes; "
                    f"the limit is max_body_bytes={self.limit}",
                )
            if refusal is not None:
                response = JSONResponse({"error": refusal[1]}, status_code=refusal[0])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _key_checker(key: str | None) -> Any:
    """A dependency requiring ``Authorization: Bearer <key>`` when a key is set."""

    def check(request: Request) -> None:
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ServiceError(
                401,
                "this service needs an API key: send 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ServiceError(403, "the API key is not valid")

    return check


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


def _page(info: BundleInfo, config: ServeApp, needs_key: bool) -> str:
    template = files("seq2seq.service").joinpath(PAGE).read_text(encoding="utf-8")
    values = {
        "{{SOURCE}}": info.source_language,
        "{{TARGET}}": info.target_language,
        "{{BEAM_SIZE}}": str(config.decode.beam_size),
        "{{MAX_BEAM_SIZE}}": str(config.max_beam_size),
        "{{NEEDS_KEY}}": "true" if needs_key else "false",
    }
    for name, value in values.items():
        template = template.replace(name, value)
    return template


def check_config(config: ServeApp) -> None:
    """Fail at start, naming the key, when a limit or batching setting cannot work."""
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
    """The FastAPI app: routes, limits, the batcher's life cycle and the API key
    (``config.api_key``, else the ``SEQ2SEQ_API_KEY`` environment variable)."""
    check_config(config)
    key = config.api_key or os.environ.get(API_KEY_ENV) or None
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["batcher"] = batcher = Batcher(translator, config, metrics)
        batcher.start()
        yield
        await batcher.close()

    app = FastAPI(title="seq2seq translation service", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    authorized = [Depends(_key_checker(key))]
    metrics = _install_scheduling(app, state, authorized)
    _install_error_handlers(app)
    started = time.time()

    @app.post("/translate", response_model=TranslateResponse, dependencies=authorized)
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

    @app.get("/info", dependencies=authorized)
    async def describe() -> dict[str, Any]:
        """The model, decoding defaults, limits, batching settings and counters."""
        batcher = state.get("batcher")
        return _info(info, config, batcher, uptime=time.time() - started)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return _page(info, config, needs_key=bool(key))

    return app


def _install_scheduling(
    app: FastAPI, state: dict[str, Batcher], authorized: list[Any]
) -> ServiceMetrics:
    """The app's metrics (its own registry), ``GET /metrics``, load shedding at the
    door (503 while the queue is full, before the body is read) and the request
    counter outside everything, so it sees every answer."""
    metrics = ServiceMetrics()

    @app.get("/metrics", dependencies=authorized, include_in_schema=False)
    async def prometheus() -> Response:
        """Counters, gauges and latency histograms in Prometheus' text format."""
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    def refusal() -> str | None:
        batcher = state.get("batcher")
        return batcher.refusal() if batcher is not None else None

    app.add_middleware(QueueGate, refusal=refusal)
    app.add_middleware(RequestCounter, metrics=metrics)
    return metrics


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
