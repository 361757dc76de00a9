"""The service's scheduler: requests queue here and their sentences are searched in
live batches that they enter and leave step by step.

Why per step: a batch formed per request group and searched to its end makes a
sentence that arrives one step after it started wait for the whole batch, and the
batch shrinks as its sentences finish while the queue grows. Here each of
``workers`` search threads runs a live batch (`seq2seq.decoding.live`, Orca's
iteration-level scheduling): at every decoding step the sentences that finished are
answered at once and leave, and waiting sentences with the same decoding settings
are encoded and enter, up to ``max_batch_sentences`` sentences and
``max_batch_tokens`` source pieces (together: once they are a quarter of the batch,
or after a few steps, since encoding a few costs about as much as encoding many).
A request is answered when its last line is. Search treats every sentence
independently of its batch-mates, whichever step they joined at, so scheduling never
changes a translation.

Different decoding settings never share a search: a search takes only requests
with its settings. So that one setting cannot starve another, a search stops taking
new requests once a request with other settings, which no search serves, has waited
``max_wait_ms``; it then finishes what it holds and its thread serves the oldest
request. A request is tokenized on the search thread that takes it, so a line the
tokenizer refuses fails its own request only.

Why bounded: the queue holds at most ``max_queue`` sentences; beyond it a request
is refused at once with 503 and ``Retry-After`` (decided synchronously: at the door
while the queue is full, `seq2seq.service.admission`, else before the handler
awaits anything), and a request whose answer takes longer than ``timeout``
seconds gets 504. On shutdown the batcher finishes every queued request before it
stops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from seq2seq.config import ServeApp
from seq2seq.decoding.translator import TextHypothesis, Translator
from seq2seq.runtime import cores
from seq2seq.service.api import DecodeKey, ServiceError
from seq2seq.service.metrics import ServiceMetrics

__all__ = ["Batcher", "Job", "JobQueue", "Stats", "search_workers"]

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
# Waiting sentences enter a running search once they are a quarter of it, or after
# four steps (`LiveLoop._time_to_enter`).
ENTRY_SHARE = 4
ENTRY_STEPS = 4


@dataclass(eq=False)
class Job:
    """One request waiting for its lines' n-best lists."""

    lines: list[str]
    key: DecodeKey
    future: asyncio.Future[list[list[TextHypothesis]]]
    arrived: float  # time.perf_counter()
    ids: list[list[int]] | None = None  # tokenized by the search that takes it
    found: list[list[TextHypothesis]] = field(default_factory=list)
    left: int = 0  # lines still being searched
    entered: float = 0.0


@dataclass
class Stats:
    """Counters since start, shown at ``/info``."""

    requests: int = 0  # accepted into the queue
    sentences: int = 0  # searched
    batches: int = 0  # live batches started (each serves many requests in turn)
    largest_batch: int = 0  # most sentences searched together at one step
    steps: int = 0  # decoding steps, over all live batches
    rejected: int = 0  # 503: queue full or shutting down
    timed_out: int = 0  # 504
    search_seconds: float = 0.0  # summed over steps (several searches run at once)


class JobQueue:
    """The waiting requests, shared by the event loop and the search threads (locked)."""

    def __init__(self, max_wait: float) -> None:
        self.lock = threading.Lock()
        self.sentences = 0  # in the queue
        self._jobs: deque[Job] = deque()
        self._max_wait = max_wait
        self._served: Counter[DecodeKey] = Counter()  # searches running, per setting

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        with self.lock:
            self._jobs.append(job)
            self.sentences += len(job.lines)

    def take(self, job: Job) -> bool:
        """Remove ``job`` if it still waits (it may have timed out)."""
        with self.lock:
            if job not in self._jobs:
                return False
            self._jobs.remove(job)
            self.sentences -= len(job.lines)
            return True

    def serving(self, key: DecodeKey, change: int) -> None:
        with self.lock:
            self._served[key] += change

    def waiting_keys(self) -> list[DecodeKey]:
        """The settings of the waiting requests, oldest first, each once."""
        with self.lock:
            return list(dict.fromkeys(job.key for job in self._jobs))

    def waiting_for(self, key: DecodeKey) -> int:
        """Sentences waiting with ``key``."""
        with self.lock:
            return sum(len(job.lines) for job in self._jobs if job.key == key)

    def next_for(self, key: DecodeKey) -> Job | None:
        """The oldest request with ``key``, unless a request with other settings that
        no search serves has waited ``max_wait`` seconds ahead of it."""
        now = time.perf_counter()
        with self.lock:
            for job in self._jobs:
                if job.key == key:
                    return job
                if not self._served[job.key] and now - job.arrived >= self._max_wait:
                    return None
        return None


class LiveLoop:
    """One live batch with one decoding setting, run on a search thread: it takes its
    setting's requests from the queue as room allows, steps, and answers each request
    when its last line finishes; it ends when it holds nothing and nothing it may
    take waits."""

    def __init__(
        self,
        translator: Translator,
        key: DecodeKey,
        config: ServeApp,
        queue: JobQueue,
        counters: tuple[Stats, ServiceMetrics],
        post: Callable[..., Any],
    ) -> None:
        self.key = key
        self.size = 0  # sentences inside, read by the event loop
        self.full = False  # the oldest request it may take did not fit, read likewise
        self.spare_workers = 0  # free search threads when it started
        # workers=1: the service runs its searches side by side, one per search thread
        self._translator = translator.with_decode(
            beam_size=key.beam_size, nbest=key.nbest, workers=1
        )
        self._config = config
        self._queue = queue
        self._stats, self._metrics = counters
        self._post = post  # runs a callable on the event loop
        self._deferred = 0  # steps the waiting sentences have been kept out

    def run(self) -> None:
        translator = self._translator
        live = translator.live(attention=self.key.attention)
        inside: set[Job] = set()
        steps = 0
        with translator.search_mode():
            while True:
                sources, tags = self._admit(live.size, live.pieces, inside)
                if not sources and not live.size:
                    break
                try:
                    live.add(sources, tags)
                    self.size = live.size
                    start = time.perf_counter()
                    finished = live.step()
                    seconds = time.perf_counter() - start
                    done = self._record(translator, finished)
                except Exception as e:  # a bug in search fails the requests it holds
                    logger.exception("search failed with %d requests inside", len(inside))
                    for job in inside:
                        self._answer(job, ServiceError(500, f"search failed: {type(e).__name__}"))
                    inside.clear()
                    live = translator.live(attention=self.key.attention)
                    self.size = 0
                    continue
                self.size = live.size
                self._count(seconds, len(finished), self.size + len(finished), first=not steps)
                steps += 1
                for job in done:
                    inside.discard(job)
                    self._answer(job, None)

    def _admit(
        self, size: int, pieces: int, inside: set[Job]
    ) -> tuple[list[list[int]], list[tuple[Job, int]]]:
        """Take waiting requests, oldest first, while they fit; returns the source ids
        and tags of their non-empty lines (tokenized here, off the event loop)."""
        sources: list[list[int]] = []
        tags: list[tuple[Job, int]] = []
        if size and not self._time_to_enter(size):
            return sources, tags
        full = False
        while (job := self._queue.next_for(self.key)) is not None:
            if job.ids is None:
                try:
                    job.ids = self._translator.source_ids(job.lines)
                except Exception as e:  # a line the tokenizer refuses fails its request
                    if self._queue.take(job):
                        refused = ServiceError(422, f"q cannot be tokenized: {e}")
                        self._answer(job, refused)
                    continue
            lines = sum(1 for ids in job.ids if ids)
            length = sum(len(ids) for ids in job.ids)
            room = (
                size + lines <= self._config.max_batch_sentences
                and pieces + length <= self._config.max_batch_tokens
            )
            if size and not room:
                full = True
                break
            if not self._queue.take(job):
                continue  # it gave up waiting meanwhile
            size, pieces = size + lines, pieces + length
            job.entered = time.perf_counter()
            self._metrics.queue_wait.observe(job.entered - job.arrived)
            job.found = [[] for _ in job.lines]
            job.left = lines
            if not lines:
                self._answer(job, None)
                continue
            inside.add(job)
            for i, ids in enumerate(job.ids):
                if ids:
                    sources.append(ids)
                    tags.append((job, i))
        if full and not self.full and self.spare_workers:
            self._post(None, None)  # another search thread may take what does not fit
        self.full = full
        return sources, tags

    def _time_to_enter(self, size: int) -> bool:
        """Whether waiting sentences enter a batch of ``size`` now: once they are at
        least ``1 / ENTRY_SHARE`` of it, or have been deferred ``ENTRY_STEPS`` steps.

        Why not at every step: encoding is a sequential pass over the source that
        costs about as much for a few sentences as for many, so sentences entering
        one or two at a time would double the search's CPU time per sentence; a
        few steps' wait lets them enter together, at little cost in latency.
        """
        waiting = self._queue.waiting_for(self.key)
        if not waiting:
            self._deferred = 0
            return False
        if waiting * ENTRY_SHARE >= size or self._deferred >= ENTRY_STEPS:
            self._deferred = 0
            return True
        self._deferred += 1
        return False

    def _record(
        self, translator: Translator, finished: list[tuple[tuple[Job, int], Any]]
    ) -> list[Job]:
        """Store the finished lines' texts; returns the requests now complete."""
        done = []
        for (job, i), hyps in finished:
            job.found[i] = translator.texts(job.lines[i], job.ids[i] if job.ids else [], hyps)
            job.left -= 1
            if job.left == 0:
                done.append(job)
        return done

    def _count(self, seconds: float, answered: int, searched: int, *, first: bool) -> None:
        with self._queue.lock:
            stats = self._stats
            stats.steps += 1
            stats.search_seconds += seconds
            stats.sentences += answered
            stats.largest_batch = max(stats.largest_batch, searched)
            stats.batches += first
        self._metrics.occupancy.observe(searched)

    def _answer(self, job: Job, error: BaseException | None) -> None:
        now = time.perf_counter()
        outcome = "failed" if error is not None else "translated"
        self._metrics.sentences.labels(outcome).inc(len(job.lines))
        if error is None:
            self._metrics.search.observe(now - job.entered)
            self._metrics.total.observe(now - job.arrived)
        self._post(job, error)


class Batcher:
    """Queues requests and runs live batches on its search threads (see the module
    docstring); the event-loop side."""

    def __init__(
        self, translator: Translator, config: ServeApp, metrics: ServiceMetrics | None = None
    ) -> None:
        self._translator = translator
        self._config = config
        self.metrics = metrics or ServiceMetrics()
        self.queue = JobQueue(config.max_wait_ms / 1000)
        self.stats = Stats()
        self._wake = asyncio.Event()
        self._workers = search_workers(config)
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="seq2seq-search")
        self._searches: dict[asyncio.Future[None], LiveLoop] = {}
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.metrics.watch(
            lambda: self.queue.sentences, lambda: self.live_sentences, lambda: self.searching
        )

    @property
    def ready(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def waiting(self) -> int:
        """Sentences queued and not yet in a search."""
        return self.queue.sentences

    @property
    def searching(self) -> int:
        """Live batches running now."""
        return len(self._searches)

    @property
    def live_sentences(self) -> int:
        """Sentences being searched now."""
        return sum(search.size for search in list(self._searches.values()))

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    async def close(self) -> None:
        """Refuse new requests, finish every queued one, then stop the search threads."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def enqueue(self, lines: list[str], key: DecodeKey) -> Job:
        """Queue ``lines`` now, or refuse them now: no await, so a refusal never waits
        behind anything.

        Raises:
            ServiceError: 503 when the queue is full or the service is stopping.
        """
        reason = self.refusal(len(lines))
        if reason is not None:
            self.metrics.sentences.labels("rejected").inc(len(lines))
            raise ServiceError(503, reason, {"Retry-After": str(RETRY_AFTER_SECONDS)})
        loop = asyncio.get_running_loop()
        job = Job(lines, key, loop.create_future(), time.perf_counter())
        self.queue.put(job)
        self.stats.requests += 1
        self._wake.set()
        return job

    def refusal(self, lines: int = 1) -> str | None:
        """Why ``lines`` more sentences cannot be queued now (counted as a refused
        request), or None when they can. Synchronous: it never waits."""
        if not self._closing and self.queue.sentences + lines <= self._config.max_queue:
            return None
        self.stats.rejected += 1
        reason = "the service is shutting down" if self._closing else "the queue is full"
        return f"{reason} (max_queue={self._config.max_queue} sentences); retry later"

    async def answer(self, job: Job) -> list[list[TextHypothesis]]:
        """The n-best lists of ``job``'s lines, once its last line is searched.

        Raises:
            ServiceError: 504 when no answer came within ``timeout`` seconds.
        """
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self._config.timeout)
        except asyncio.TimeoutError:
            # Still queued: it leaves the queue; being searched: it finishes unread.
            self.queue.take(job)
            job.future.cancel()
            self.stats.timed_out += 1
            self.metrics.sentences.labels("timed_out").inc(len(job.lines))
            raise ServiceError(
                504, f"no translation within timeout={self._config.timeout:g} seconds"
            ) from None

    async def submit(self, lines: list[str], key: DecodeKey) -> list[list[TextHypothesis]]:
        """`enqueue` then `answer`: queued or refused (503) before the first await,
        so a refusal never waits."""
        return await self.answer(self.enqueue(lines, key))

    async def _run(self) -> None:
        """Start a live batch whenever a search thread is free and a request waits
        that no running search can take; until closed and the queue is empty."""
        while True:
            self._wake.clear()
            key = self._key_to_start()
            if key is not None:
                self._start(key)
                continue
            if self._closing and not len(self.queue) and not self._searches:
                return
            await self._wake.wait()

    def _key_to_start(self) -> DecodeKey | None:
        """The settings of the oldest waiting request that every running search with
        its settings is too full to take (none running counts as full)."""
        if len(self._searches) >= self._workers:
            return None
        for key in self.queue.waiting_keys():
            mates = [s for s in self._searches.values() if s.key == key]
            if all(s.full for s in mates):
                return key
        return None

    def _start(self, key: DecodeKey) -> None:
        loop = asyncio.get_running_loop()
        search = LiveLoop(
            self._translator,
            key,
            self._config,
            self.queue,
            (self.stats, self.metrics),
            self._post,
        )
        search.spare_workers = self._workers - len(self._searches) - 1
        self.queue.serving(key, +1)
        future = loop.run_in_executor(self._executor, search.run)
        self._searches[future] = search
        future.add_done_callback(self._ended)

    def _ended(self, future: asyncio.Future[None]) -> None:
        search = self._searches.pop(future)
        self.queue.serving(search.key, -1)
        if future.exception() is not None:  # run() catches search errors; this is a bug
            logger.error("a search thread failed", exc_info=future.exception())
        self._wake.set()

    def _post(self, job: Job | None, error: BaseException | None) -> None:
        """From a search thread: `_settle` on the event loop."""
        assert self._loop is not None, "searches run only after start()"
        self._loop.call_soon_threadsafe(self._settle, job, error)

    def _settle(self, job: Job | None, error: BaseException | None) -> None:
        """On the event loop: hand a job its answer (unless it gave up waiting); with
        no job, look again for a search to start."""
        if job is None:
            self._wake.set()
            return
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(job.found)


def search_workers(config: ServeApp) -> int:
    """Live batches searched at once: ``config.workers``, or one per CPU core."""
    return config.workers or cores()
