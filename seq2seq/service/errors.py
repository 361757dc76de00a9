"""One error shape for every answer that is not a success: ``{"error": message}``.

Why: clients read one key whatever refused them. FastAPI answers its own refusals
(404 unknown path, 405 wrong method) with ``{"detail": ...}`` and an unexpected
exception with a plain-text 500; the handlers here word those as the service's
own refusals are worded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

__all__ = ["error_response", "install_error_handlers"]

logger = logging.getLogger(__name__)


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


def install_error_handlers(app: FastAPI) -> None:
    """Answer FastAPI's own refusals and unexpected exceptions as ``{"error": ...}``."""

    @app.exception_handler(HTTPException)
    async def refused(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, _http_message(request, error), error.headers)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        # The server logs the traceback; the client learns only that it was not its fault.
        return error_response(500, "internal error: the request could not be answered")
