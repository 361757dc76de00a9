"""Load shedding at the door: while the queue is full, ``POST /translate`` is refused
with 503 before its body is read, parsed, validated or authenticated.

Why before everything: under overload the requests that will be refused are the
many, and each one parsed, validated and checked for a key costs the event loop the
time it needs to accept the few it can queue; a full queue refuses any request (it
has at least one line), so nothing is lost by deciding early. A request that finds
room is checked in full, and the batcher still refuses one whose lines do not fit.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from seq2seq.service.batcher import RETRY_AFTER_SECONDS

__all__ = ["QueueGate"]


class QueueGate:
    """Answers 503 with ``Retry-After`` to ``POST /translate`` while ``refusal()``
    gives a reason (the queue is full, or the service is stopping)."""

    def __init__(
        self, app: ASGIApp, refusal: Callable[[], str | None], path: str = "/translate"
    ) -> None:
        self.app = app
        self.refusal = refusal
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path and scope["method"] == "POST":
            reason = self.refusal()
            if reason is not None:
                headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
                response = JSONResponse({"error": reason}, status_code=503, headers=headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
