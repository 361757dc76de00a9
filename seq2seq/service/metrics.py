"""The service's Prometheus metrics, served at ``/metrics`` in the text format.

Why a registry per app: the default registry is one per process, so two apps in
one process (tests, or two models behind one server) would count into the same
series, and registering the same names twice fails. Each app owns a
`CollectorRegistry` and everything here is registered on it.

Series (all names start with ``seq2seq_``):

- ``requests_total{status}``: ``POST /translate`` answers by HTTP status;
- ``answer_seconds{status}``: per answer, the seconds from the request reaching the
  app to its answer starting, by status: how fast a 503 is given under overload
  shows here, apart from the time a request waits to be accepted;
- ``sentences_total{status}``: their lines by outcome (``translated``, ``rejected``
  for 503, ``timed_out`` for 504, ``failed`` for an error in search or in
  tokenizing its own request); a request refused while the queue is full is
  refused before its body is read, so its lines are not counted;
- ``queue_sentences``: sentences waiting to enter a search;
- ``live_sentences`` and ``live_searches``: sentences being searched now, and the
  live batches searching them; ``live_batch_sentences``: a histogram of the batch
  size at every decoding step (its occupancy over time);
- ``queue_wait_seconds``, ``search_seconds``, ``total_seconds``: per request, the
  wait before its lines entered a search, from then until its last line finished,
  and both together.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE", "RequestCounter", "ServiceMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a sentence on an idle service to an overloaded queue.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds to any answer: refusals take well under a millisecond.
ANSWER_BUCKETS = (0.0005, 0.001, 0.0025, *LATENCY_BUCKETS)
# Sentences searched together at one step.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The series of one app, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "seq2seq_requests", "POST /translate answers by HTTP status", ["status"], registry=r
        )
        self.answer = Histogram(
            "seq2seq_answer_seconds",
            "Seconds from a POST /translate reaching the app to its answer, by status",
            ["status"],
            buckets=ANSWER_BUCKETS,
            registry=r,
        )
        self.sentences = Counter(
            "seq2seq_sentences", "Lines of /translate requests by outcome", ["status"], registry=r
        )
        self.queue = Gauge(
            "seq2seq_queue_sentences", "Sentences waiting to be searched", registry=r
        )
        self.live = Gauge("seq2seq_live_sentences", "Sentences being searched now", registry=r)
        self.searches = Gauge("seq2seq_live_searches", "Live batches searching now", registry=r)
        self.occupancy = Histogram(
            "seq2seq_live_batch_sentences",
            "Sentences in a live batch at each decoding step",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = self._latency("queue_wait", "Seconds a request waited for a search")
        self.search = self._latency("search", "Seconds from entering a search to the answer")
        self.total = self._latency("total", "Seconds from arrival to the answer")

    def _latency(self, name: str, text: str) -> Histogram:
        return Histogram(
            f"seq2seq_{name}_seconds", text, buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def watch(
        self, queued: Callable[[], int], live: Callable[[], int], searches: Callable[[], int]
    ) -> None:
        """Read the queue depth, the sentences searched and the live batches when
        scraped, not on every change."""
        self.queue.set_function(queued)
        self.live.set_function(live)
        self.searches.set_function(searches)

    def text(self) -> bytes:
        """Every series in Prometheus' text format."""
        return generate_latest(self.registry)


class RequestCounter:
    """Counts and times the answers to ``POST /translate`` by status, whichever layer
    gave them (the queue gate, the body limit, the key check, validation, the batcher
    or the route)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, path: str = "/translate") -> None:
        self.app = app
        self.metrics = metrics
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = str(message["status"])
                self.metrics.requests.labels(status).inc()
                self.metrics.answer.labels(status).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, counted)
