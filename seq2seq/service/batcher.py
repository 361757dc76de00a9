"""The service's scheduler: requests queue here and are searched in batches.

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
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from seq2seq.config import ServeApp
from seq2seq.decoding.translator import TextHypothesis, Translator
from seq2seq.runtime import cores
from seq2seq.service.api import DecodeKey, ServiceError

__all__ = ["Batcher", "Job", "Stats", "search_workers"]

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


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
