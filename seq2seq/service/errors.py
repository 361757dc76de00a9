"""One error shape for every answer that is not a success: ``{"error": message}``.

Why: clients read one key whatever refused them. FastAPI answers its own refusals
(404 unknown path, 405 wrong method) with ``{"detail": ...}`` and an unexpected
exception with a plain-text 500; the handlers here word those as the service's
own refusals are worded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

__all__ = ["ServiceError", "error_response", "install_error_handlers"]

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request the service refuses, answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The service's answer for a refused request."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _http_message(request: Request, error: HTTPException) -> str:
    if error.status_code == 404:
        return f"there is nothing at {request.url.path}"
    if error.status_code == 405:
        allowed = (error.headers or {}).get("allow", (error.headers or {}).get("Allow", ""))
        return f"{request.method} is not allowed on {request.url.path}; use {allowed}"
    return str(error.detail)


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


def install_error_handlers(app: FastAPI) -> None:
    """Answer the service's refusals, malformed requests, FastAPI's own refusals and
    unexpected exceptions as ``{"error": ...}``."""

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, error: ServiceError) -> JSONResponse:
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        detail = [
            {k: v for k, v in item.items() if k in ("loc", "msg", "type")}
            for item in error.errors()
        ]
        message = _validation_message(error)
        return JSONResponse({"error": message, "detail": detail}, status_code=422)

    @app.exception_handler(HTTPException)
    async def refused(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, _http_message(request, error), error.headers)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        # The server logs the traceback; the client learns only that it was not its fault.
        return error_response(500, "internal error: the request could not be answered")
