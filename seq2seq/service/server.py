"""The HTTP server's defences against slow, stalled and numerous clients.

Why a protocol of our own: uvicorn's HTTP/1.1 protocol times out only an idle
kept-alive connection; a client that connects and sends half a request head is
kept forever, and every such client holds a file descriptor. `guarded_protocol`
makes uvicorn's h11 protocol close a connection whose request head has not
arrived within ``header_timeout`` seconds (counted from when the connection
became ready for it, so a client dribbling a byte at a time gains nothing), and
refuse connections at accept beyond ``max_connections``. `RateLimit` keeps a
flood of identical log lines (accept errors when descriptors run out, malformed
requests) from filling the disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["RateLimit", "guarded_protocol", "limit_log_floods"]

_BUSY = json.dumps({"error": "too many connections; retry later"}).encode()
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
) % (len(_BUSY), _BUSY)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline, a connection cap and
    JSON 400 answers; the settings are class attributes (see `guarded_protocol`)."""

    header_timeout: float = 10.0
    max_connections: int = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self.max_connections:
            # Refused at once: the descriptor is freed now, not after a timeout.
            self._refused = True
            # uvloop's transports are not `asyncio.Transport` subclasses: cast, not checked.
            self.transport = cast(asyncio.Transport, transport)
            self.transport.write(REFUSED)
            self.transport.close()
            return
        super().connection_made(transport)  # type: ignore[arg-type]
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def _watch_head(self) -> None:
        """Run the head deadline while the connection waits for a request head."""
        if self.transport.is_closing():
            self._cancel_head_timer()
        elif self.conn.their_state is h11.IDLE and self._between_requests():
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)
        else:
            self._cancel_head_timer()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A malformed request, answered in the service's error shape."""
        body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"connection", b"close"),
            (b"content-length", str(len(body)).encode()),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def guarded_protocol(*, header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """The protocol class to give uvicorn (``http=``), with these settings."""
    return type(
        "ServiceH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )


class RateLimit(logging.Filter):
    """Pass each kind of message (logger and first line of its format string) at
    most once per ``interval`` seconds; the next one that passes says how many
    were dropped. The first line: asyncio's later lines name the socket."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg).split("\n", 1)[0])
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            return False
        self._last[kind] = now
        dropped = self._dropped.pop(kind, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this were not logged)"
        return True


def limit_log_floods(interval: float = 10.0) -> RateLimit:
    """Rate-limit the loggers a flood of clients can make write: asyncio's (accept
    errors) and uvicorn's (malformed requests, connection errors)."""
    limit = RateLimit(interval)
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(limit)
    return limit
