"""The translation service: API contract, batching, limits, overload, keys, shutdown.

Most tests drive the ASGI app in this process (httpx over ASGITransport, with the
app's lifespan running the batcher); the process boundary matters for SIGTERM and
for a bad bundle at start, which run ``python -m seq2seq.serve`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from seq2seq.config import DecodeConfig, ServeApp
from seq2seq.decoding.translator import Translator
from seq2seq.model import bundle
from seq2seq.service.app import API_KEY_ENV, create_app, describe_bundle
from tests.helpers import ROOT

BEAM = 2  # the service's default beam size in these tests


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle) -> Path:
    """The lively tiny model as a bundle (languages en -> de)."""
    return tiny_bundle


@pytest.fixture(scope="module")
def translator(bundle_dir) -> Translator:
    return Translator.from_bundle(bundle_dir, decode=DecodeConfig(beam_size=BEAM), device="cpu")


@pytest.fixture(scope="module")
def lines(pairs) -> list[str]:
    """Distinct sources, a duplicate and an empty line."""
    return [s for s, _ in pairs[:7]] + [pairs[0][0], ""]


class Gated(Translator):
    """A translator whose search steps wait for a gate: a search that takes as long as
    a test needs. A search also waits for ``entry`` before it takes its first request
    (open unless a test closes it), so a test can queue several requests first."""

    gate: threading.Event
    entry: threading.Event

    def with_decode(self, **changes: Any) -> Gated:
        other = Gated(self.model, self.tokenizer, replace(self.decode, **changes), device="cpu")
        other.gate, other.entry = self.gate, self.entry
        return other

    def live(self, *, attention: bool) -> Any:
        assert self.entry.wait(60), "entry never opened"
        return GatedLive(super().live(attention=attention), self.gate)


class GatedLive:
    """A live batch whose every step waits for the gate."""

    def __init__(self, live: Any, gate: threading.Event) -> None:
        self.live, self.gate = live, gate

    @property
    def size(self) -> int:
        return self.live.size

    @property
    def pieces(self) -> int:
        return self.live.pieces

    def add(self, sources: Any, tags: Any) -> None:
        self.live.add(sources, tags)

    def step(self) -> Any:
        assert self.gate.wait(60), "gate never opened"
        return self.live.step()


def gated(translator: Translator) -> Gated:
    result = Gated(translator.model, translator.tokenizer, translator.decode, device="cpu")
    result.gate = threading.Event()
    result.entry = threading.Event()
    result.entry.set()
    return result


def make_app(translator: Translator, bundle_dir: Path, **settings: Any):
    config = ServeApp(model=str(bundle_dir), decode=DecodeConfig(beam_size=BEAM), **settings)
    return create_app(translator, config, describe_bundle(bundle_dir, translator))


@asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` with the app's lifespan (and so its batcher) running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` (bounded, so a broken service fails instead of hanging)."""
    for _ in range(1000):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def stats(client: httpx.AsyncClient, **headers: str) -> dict[str, int]:
    return (await client.get("/info", headers=headers)).json()["stats"]


# ------------------------------------------------------------------------- API contract


def test_one_line_gives_text_and_score(translator, bundle_dir, lines):
    async def scenario():
        async with serving(make_app(translator, bundle_dir)) as client:
            return await client.post("/translate", json={"q": lines[0]})

    reply = run(scenario)
    best = translator.hypotheses([lines[0]])[0][0]
    assert reply.status_code == 200
    assert reply.json() == {
        "translations": [{"text": best.text, "score": pytest.approx(best.score, abs=1e-4)}],
        "beam_size": BEAM,
        "nbest": 1,
    }


def test_nbest_and_attention(translator, bundle_dir, lines):
    body = {"q": [lines[1], ""], "beam_size": 3, "nbest": 3, "attention": True}

    async def scenario():
        async with serving(make_app(translator, bundle_dir)) as client:
            return await client.post("/translate", json=body)

    reply = run(scenario).json()
    want = translator.with_decode(beam_size=3, nbest=3).hypotheses([lines[1]], attention=True)[0]
    first, empty = reply["translations"]
    assert (reply["beam_size"], reply["nbest"]) == (3, 3)
    assert [h["text"] for h in first["nbest"]] == [h.text for h in want]
    assert first["text"] == want[0].text
    att = first["attention"]
    assert att["src_pieces"] == list(want[0].src_pieces)
    assert att["tgt_pieces"] == list(want[0].tgt_pieces)
    assert len(att["weights"]) == len(att["tgt_pieces"])
    for row in att["weights"]:
        assert len(row) == len(att["src_pieces"])
        assert sum(row) == pytest.approx(1.0, abs=1e-2)
    assert empty == {
        "text": "",
        "score": 0.0,
        "nbest": [],
        "attention": {"src_pieces": [], "tgt_pieces": [], "weights": []},
    }


def test_concurrent_requests_are_batched_without_changing_translations(
    translator, bundle_dir, lines
):
    """While one search runs, each line arrives as its own request, at two beam sizes:
    they make two searches (never one with both settings), and every answer equals
    translating the lines directly."""
    slow = gated(translator)
    app = make_app(slow, bundle_dir, max_wait_ms=60_000, max_batch_sentences=len(lines), workers=1)

    async def scenario():
        async with serving(app) as client:
            first = asyncio.create_task(client.post("/translate", json={"q": lines[0]}))
            await until(lambda: _counts(client, requests=1, waiting=0), "first batch running")
            posts = [
                client.post("/translate", json={"q": line, "beam_size": beam})
                for beam in (1, 3)
                for line in lines
            ]
            tasks = [asyncio.create_task(post) for post in posts]
            await until(lambda: _counts(client, waiting=2 * len(lines)), "all queued")
            slow.gate.set()
            await first
            return [await task for task in tasks], await stats(client)

    replies, counters = run(scenario)
    assert counters["batches"] == 3
    assert counters["largest_batch"] == len(lines) - 1  # the empty line needs no search
    got = [r.json()["translations"][0] for r in replies]
    for beam, answers in zip((1, 3), (got[: len(lines)], got[len(lines) :]), strict=True):
        want = translator.with_decode(beam_size=beam).hypotheses(lines)
        assert [a["text"] for a in answers] == [h[0].text if h else "" for h in want]
        assert [a["score"] for a in answers] == pytest.approx(
            [h[0].score if h else 0.0 for h in want], abs=1e-4
        )
    assert len({a["text"] for a in got}) > 3  # the lines really translate differently


def test_a_request_to_an_idle_service_does_not_wait(translator, bundle_dir, lines):
    """max_wait_ms only holds a batch open right after a search; an idle service
    starts at once (this would time out otherwise)."""
    app = make_app(translator, bundle_dir, max_wait_ms=60_000, timeout=30)

    async def scenario():
        async with serving(app) as client:
            return await client.post("/translate", json={"q": lines[0]})

    assert run(scenario).status_code == 200


def test_health_ready_info_and_page(translator, bundle_dir):
    async def scenario():
        async with serving(make_app(translator, bundle_dir)) as client:
            paths = ("/health", "/ready", "/info", "/")
            return [await client.get(path) for path in paths]

    health, ready, info, page = run(scenario)
    assert health.json() == {"status": "ok"} and ready.json() == {"status": "ready"}
    info = info.json()
    weights = (bundle_dir / bundle.WEIGHTS).read_bytes()
    assert info["sha256"] == hashlib.sha256(bundle.WEIGHTS.encode() + weights).hexdigest()
    assert (info["source_language"], info["target_language"]) == ("en", "de")
    assert info["parameters"] == sum(p.numel() for p in translator.model.parameters())
    assert info["decode"]["beam_size"] == BEAM
    assert info["limits"]["max_lines"] == ServeApp.max_lines
    assert info["batching"]["max_queue"] == ServeApp.max_queue
    assert page.status_code == 200 and "en → de" in page.text
    no_namespace = page.text.replace('"http://www.w3.org/2000/svg"', "")
    assert "http://" not in no_namespace and "https://" not in no_namespace  # no CDN


# --------------------------------------------------------------------- limits and errors

JSON = {"content-type": "application/json"}
LIMITS = {"max_lines": 3, "max_chars": 40, "max_body_bytes": 600, "max_beam_size": 4}
ERRORS = [
    ({"content": b'{"q": ', "headers": JSON}, 422, "malformed JSON at character 6"),
    ({"content": b"q=text", "headers": {"content-type": "text/plain"}}, 422, "JSON object"),
    ({"json": ["text"]}, 422, "JSON object"),
    ({"json": {}}, 422, "q: Field required"),
    ({"json": {"q": 5}}, 422, "q: must be a string or a list of strings"),
    ({"json": {"q": ["a", 5]}}, 422, "q.1"),
    ({"json": {"q": "a", "beam_size": "5"}}, 422, "beam_size"),
    ({"json": {"q": "a", "beam_size": 0}}, 422, "beam_size"),
    ({"json": {"q": "a", "attention": "yes"}}, 422, "attention"),
    ({"json": {"q": "a", "beam": 3}}, 422, "beam: Extra inputs"),
    ({"json": {"q": "a", "beam_size": 5}}, 422, "max_beam_size=4"),
    ({"json": {"q": "a", "beam_size": 2, "nbest": 3}}, 422, "nbest=3"),
    ({"json": {"q": "a", "target": "fr"}}, 422, "en -> de"),
    ({"json": {"q": ["a", "b", "c", "d"]}}, 413, "max_lines=3"),
    ({"json": {"q": ["a", "x" * 41]}}, 413, "line 1 of q has 41 characters"),
    ({"json": {"q": ["a" * 40] * 3, "nbest": 1, "source": "x" * 500}}, 413, "max_body_bytes"),
]


@pytest.mark.parametrize(("request_args", "status", "message"), ERRORS)
def test_errors_name_the_problem(translator, bundle_dir, request_args, status, message):
    async def scenario():
        async with serving(make_app(translator, bundle_dir, **LIMITS)) as client:
            return await client.post("/translate", **request_args)

    reply = run(scenario)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]


def test_within_limits_is_accepted(translator, bundle_dir):
    body = {"q": ["a" * 40] * 3, "beam_size": 4, "source": "en", "target": "de"}

    async def scenario():
        async with serving(make_app(translator, bundle_dir, **LIMITS)) as client:
            return await client.post("/translate", json=body)

    assert run(scenario).status_code == 200


def test_a_chunked_body_within_the_limit_is_accepted(translator, bundle_dir):
    async def chunks():
        yield b'{"q": '
        yield b'"a"}'

    async def scenario():
        async with serving(make_app(translator, bundle_dir)) as client:
            return await client.post("/translate", content=chunks(), headers=JSON)

    reply = run(scenario)
    assert reply.status_code == 200 and len(reply.json()["translations"]) == 1


def test_bad_settings_fail_at_start(translator, bundle_dir):
    with pytest.raises(ValueError, match="max_queue=0"):
        make_app(translator, bundle_dir, max_queue=0)
    with pytest.raises(ValueError, match="max_beam_size=1"):
        make_app(translator, bundle_dir, max_beam_size=1)


# ----------------------------------------------------------------------- authorization


@pytest.mark.parametrize("from_env", [False, True])
def test_api_key_is_required_when_set(translator, bundle_dir, monkeypatch, from_env):
    if from_env:
        monkeypatch.setenv(API_KEY_ENV, "s3cret")
        app = make_app(translator, bundle_dir)
    else:
        monkeypatch.delenv(API_KEY_ENV, raising=False)
        app = make_app(translator, bundle_dir, api_key="s3cret")
    body = {"q": "a"}

    async def scenario():
        async with serving(app) as client:
            return [
                await client.post("/translate", json=body),
                await client.post("/translate", json=body, headers={"Authorization": "s3cret"}),
                await client.post("/translate", json=body, headers={"Authorization": "Bearer no"}),
                await client.get("/info"),
                await client.post(
                    "/translate", json=body, headers={"Authorization": "Bearer s3cret"}
                ),
                await client.get("/health"),
            ]

    missing, bare, wrong, info, right, health = run(scenario)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["error"]
    assert bare.status_code == 401
    assert wrong.status_code == 403 and info.status_code == 401
    assert right.status_code == 200 and health.status_code == 200


def test_no_key_no_check(translator, bundle_dir, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)

    async def scenario():
        async with serving(make_app(translator, bundle_dir)) as client:
            return await client.post("/translate", json={"q": "a"})

    assert run(scenario).status_code == 200


# ------------------------------------------------------------------- overload, timeouts


def test_a_full_queue_answers_503_at_once_and_then_recovers(translator, bundle_dir):
    """One batch runs (held at a gate) while two sentences wait: the queue is full, so a
    further request gets 503 with Retry-After, not a wait; all accepted ones finish."""
    slow = gated(translator)
    app = make_app(slow, bundle_dir, max_queue=2, max_batch_sentences=1, max_wait_ms=0, workers=1)

    async def scenario():
        async with serving(app) as client:

            def post(line: str) -> asyncio.Task[httpx.Response]:
                return asyncio.create_task(client.post("/translate", json={"q": line}))

            running = post("a b")
            await until(lambda: _counts(client, requests=1, waiting=0), "first batch taken")
            queued = [post("c d"), post("e f")]
            await until(lambda: _counts(client, requests=3, waiting=2), "two waiting")
            refused = await client.post("/translate", json={"q": "g"})
            slow.gate.set()
            accepted = [await task for task in (running, *queued)]
            after = await client.post("/translate", json={"q": "g"})
            return refused, accepted, after, await stats(client)

    refused, accepted, after, counters = run(scenario)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "max_queue=2" in refused.json()["error"]
    assert [r.status_code for r in accepted] == [200, 200, 200]
    assert after.status_code == 200
    assert counters["rejected"] == 1 and counters["sentences"] == 4


async def _counts(client: httpx.AsyncClient, **wanted: int) -> bool:
    counters = await stats(client)
    return all(counters[name] == value for name, value in wanted.items())


def test_a_request_waiting_too_long_gets_504(translator, bundle_dir):
    """Both the request being searched and the one queued behind it give up; the
    queued one leaves the queue, the search finishes unread."""
    slow = gated(translator)
    app = make_app(slow, bundle_dir, timeout=0.2, max_batch_sentences=1, max_wait_ms=0, workers=1)

    async def scenario():
        async with serving(app) as client:
            running = client.post("/translate", json={"q": "a b"})
            queued = client.post("/translate", json={"q": "c d"})
            timed_out = await asyncio.gather(running, queued)
            waiting = (await stats(client))["waiting"]
            slow.gate.set()
            await until(lambda: _counts(client, searching=0, batches=1), "search finished")
            return timed_out, waiting, await stats(client)

    timed_out, waiting, counters = run(scenario)
    assert [r.status_code for r in timed_out] == [504, 504]
    assert "timeout=0.2" in timed_out[0].json()["error"]
    assert waiting == 0  # the queued request left the queue when it gave up
    assert counters["timed_out"] == 2 and counters["sentences"] == 1


def test_workers_search_batches_side_by_side(translator, bundle_dir, lines):
    slow = gated(translator)
    app = make_app(slow, bundle_dir, max_batch_sentences=2, max_wait_ms=0, workers=2)
    # All three wait before the first search takes any: a search blocked in a step
    # finds it is full only when it looks at the queue again.
    slow.entry.clear()

    async def scenario():
        async with serving(app) as client:
            tasks = [
                asyncio.create_task(client.post("/translate", json={"q": lines[:2]}))
                for _ in range(3)
            ]
            await until(lambda: _counts(client, searching=1, waiting=6), "all three queued")
            slow.entry.set()
            await until(lambda: _counts(client, searching=2, waiting=2), "two batches at once")
            slow.gate.set()
            replies = [await task for task in tasks]
            await until(lambda: _counts(client, searching=0), "both searches ended")
            return replies, await stats(client)

    replies, counters = run(scenario)
    assert [r.status_code for r in replies] == [200] * 3
    # the third request entered one of the two searches when it had room
    assert counters["batches"] == 2


def test_shutdown_answers_every_queued_request(translator, bundle_dir, lines):
    """The batcher stops only after searching what is queued (which would otherwise
    wait a minute for company)."""
    slow = gated(translator)
    app = make_app(slow, bundle_dir, max_wait_ms=60_000, max_batch_sentences=1000, workers=1)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async with app.router.lifespan_context(app):
                first = asyncio.create_task(client.post("/translate", json={"q": "a b"}))
                await until(lambda: _counts(client, requests=1, waiting=0), "a search running")
                tasks = [
                    asyncio.create_task(client.post("/translate", json={"q": line}))
                    for line in lines
                ]
                await until(lambda: _counts(client, waiting=len(lines)), "all queued")
                slow.gate.set()
            # the lifespan has ended: the batcher stopped after searching the queue
            return [await task for task in (first, *tasks)]

    replies = run(scenario)
    assert [r.status_code for r in replies] == [200] * (len(lines) + 1)
    texts = [r.json()["translations"][0]["text"] for r in replies[1:]]
    assert texts == translator.translate(lines)


# ----------------------------------------------------------------- the app, as a process


def serve_process(*args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop(API_KEY_ENV, None)
    return subprocess.Popen(
        [sys.executable, "-m", "seq2seq.serve", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
    )


def wait_for_address(process: subprocess.Popen[str]) -> str:
    """The URL from the ``listening on`` line (the port was picked by the OS)."""
    assert process.stderr is not None
    for line in process.stderr:
        if "listening on" in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep draining
            return line.split("listening on ")[1].strip().rstrip("/")
    raise AssertionError(f"the server never listened (exit code {process.wait()})")


def _queue_behind_a_search(bundle_dir, lines):
    """A server with every line posted and some of them queued, or None when the
    requests happened to be searched as they came (then nothing is queued to drain)."""
    process = serve_process(
        f"model={bundle_dir}",
        "port=0",
        f"decode.beam_size={BEAM}",
        "max_batch_sentences=1",
    )
    url = wait_for_address(process)
    replies: dict[int, httpx.Response] = {}

    def post(i: int) -> None:
        replies[i] = httpx.post(f"{url}/translate", json={"q": lines[i]}, timeout=60)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(lines))]
    for thread in threads:
        thread.start()
    for _ in range(1000):
        counters = httpx.get(f"{url}/info").json()["stats"]
        if counters["requests"] == len(lines) and counters["waiting"] > 0:
            return process, threads, replies
        if counters["requests"] == len(lines) and counters["sentences"] == len(lines):
            break  # all answered already: nothing is left to drain
        time.sleep(0.01)
    process.kill()
    for thread in threads:
        thread.join(60)
    return None


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight(bundle_dir, translator, lines):
    """Requests queued when SIGTERM arrives are all answered; then the process exits.

    The first request starts a search at once; the rest wait for room in it.
    Whether any request queues depends on when the client threads run, so the
    scenario is set up again (at most three times) until some do."""
    for _ in range(3):
        queued = _queue_behind_a_search(bundle_dir, lines)
        if queued is not None:
            break
    else:
        raise AssertionError("the requests never queued")
    process, threads, replies = queued
    try:
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        code = process.wait(60)
    finally:
        process.kill()
    assert [replies[i].status_code for i in range(len(lines))] == [200] * len(lines)
    texts = [replies[i].json()["translations"][0]["text"] for i in range(len(lines))]
    assert texts == translator.translate(lines)
    assert code in (0, -signal.SIGTERM)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["model=/no/such/bundle"], "/no/such/bundle"), (["model=x", "max_queue=0"], "max_queue=0")],
)
def test_start_failures_are_one_error_line(args, message):
    process = serve_process(*args)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_port_in_use_is_one_error_line(bundle_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = serve_process(f"model={bundle_dir}", f"port={port}")
        _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and err.startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_config_composes():
    """The primary config composes with its schema (as CI's ``--cfg job`` check does)."""
    out = subprocess.run(
        [sys.executable, "-m", "seq2seq.serve", "--cfg", "job", "model=x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    ).stdout
    assert "max_batch_sentences: 64" in out and "host: 127.0.0.1" in out
