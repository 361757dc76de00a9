"""What a request must pass before the app sees it: the API key, then a bounded body.

Why in front of the app, at the ASGI level: FastAPI reads a request's whole body
before it runs the route's dependencies, so a key checked there is checked only
after an anonymous client has sent everything it wanted, and a ``Content-Length``
checked up front says nothing about a chunked body. Here the key is checked on
the headers alone, and the body is read message by message, counting the bytes
that actually arrive: past ``max_body_bytes`` the request is refused (413) and
nothing more is read; a body that has not arrived within ``body_timeout`` seconds
is refused (408). The body read here (at most the limit) is handed to the app.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seq2seq.service.errors import error_response

__all__ = ["PUBLIC_PATHS", "PUBLIC_PREFIXES", "Guard", "text_problem"]

# Served without a key: the page, the probes and the API's own description.
PUBLIC_PATHS = frozenset(
    {"/", "/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
PUBLIC_PREFIXES = ("/docs-assets/",)


class Guard:
    """ASGI middleware: the key on the headers, then the body within its limits."""

    def __init__(self, app: ASGIApp, *, key: str | None, limit: int, body_timeout: float) -> None:
        self.app = app
        self.key = key
        self.limit = limit
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._authorize(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        body = await self._read_body(receive)
        if not isinstance(body, bytes):
            if body is not None:
                await body(scope, receive, send)
            return

        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later messages: the client going away

        await self.app(scope, replay, send)

    def _authorize(self, scope: Scope) -> ASGIApp | None:
        """None when the request may go on, else the answer refusing it."""
        path = scope["path"]
        if not self.key or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return None
        headers = dict(scope["headers"])
        # A body left unread would otherwise be read and thrown away for as long
        # as the client sends it: the connection closes after the answer instead.
        close = {"Connection": "close"} if _has_body(headers) else {}
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return error_response(
                401,
                "this service needs an API key: send 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer", **close},
            )
        if not hmac.compare_digest(token.strip().encode("latin-1"), self.key.encode()):
            return error_response(403, "the API key is not valid", close)
        return None

    async def _read_body(self, receive: Receive) -> bytes | ASGIApp | None:
        """The whole body; or the answer refusing it; or None when the client left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return error_response(
                    408,
                    f"the request body did not arrive within body_timeout={self.body_timeout:g} "
                    "seconds",
                    {"Connection": "close"},
                )
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return error_response(
                    413,
                    f"the request body has more than {self.limit} bytes; "
                    f"the limit is max_body_bytes={self.limit}",
                    {"Connection": "close"},
                )
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"


def text_problem(lines: Sequence[str]) -> str | None:
    """Why ``lines`` are not text the tokenizer can read, or None when they are.

    JSON can carry a lone surrogate (``"\\ud800"``), which is a Python string but
    no UTF-8 text: refused here, it fails its own request instead of the search
    that would have held it beside other clients' sentences.
    """
    for i, line in enumerate(lines):
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as e:
            return (
                f"line {i} of q is not valid Unicode text (a lone surrogate at character {e.start})"
            )
    return None
