"""The translation service: a FastAPI app over a `Translator` and its `Batcher`.

The scheduler lives in `seq2seq.service.batcher`, the request and response bodies
and the checks a request passes in `seq2seq.service.api`; this module holds the web
plumbing: routes and the installation of the guards (`service.guards`), the
error answers (`service.errors`) and the page (`service.page`). The API
(request and response bodies are JSON) is served as OpenAPI at ``/docs``. Hydra
stays in the app (`seq2seq.serve`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline

from seq2seq.config import ServeApp, validate
from seq2seq.decoding.translator import Translator
from seq2seq.model import bundle as bundle_io
from seq2seq.service.admission import QueueGate
from seq2seq.service.api import (
    BundleInfo,
    TranslateRequest,
    TranslateResponse,
    _check_request,
    _decode_key,
    _translation,
)
from seq2seq.service.batcher import Batcher, Stats, search_workers
from seq2seq.service.errors import install_error_handlers
from seq2seq.service.guards import Guard
from seq2seq.service.metrics import CONTENT_TYPE, RequestCounter, ServiceMetrics
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
    """The FastAPI app: routes, guards (key, body limits), the page, error answers,
    metrics and the batcher's life cycle. The key is ``config.api_key``, else the
    ``SEQ2SEQ_API_KEY`` environment variable."""
    check_config(config)
    key = config.api_key or os.environ.get(API_KEY_ENV) or None
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["batcher"] = batcher = Batcher(translator, config, metrics)
        batcher.start()
        yield
        await batcher.close()

    app = _web_app(config, info, key, lifespan)
    metrics = _install_scheduling(app, state)  # outside the guard: sheds load first
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


def _web_app(
    config: ServeApp, info: BundleInfo, key: str | None, lifespan: Callable[[FastAPI], Any]
) -> FastAPI:
    """The app with its web plumbing: offline docs, the guard, error answers, the page."""
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
    return app


def _install_scheduling(app: FastAPI, state: dict[str, Batcher]) -> ServiceMetrics:
    """The app's metrics (its own registry), ``GET /metrics``, load shedding at the
    door (503 while the queue is full, before the body is read) and the request
    counter outside everything, so it sees every answer."""
    metrics = ServiceMetrics()

    @app.get("/metrics", include_in_schema=False)
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
