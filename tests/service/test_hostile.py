"""The service against hostile or broken clients: no client can hurt another.

A bad line fails only its own request; the key is checked and the body counted
before a body is read; the page shows a bundle's strings as text; slow, stalled
and numerous clients are cut; SIGTERM exits within its drain bound; every refusal
is ``{"error": ...}``; bad settings are one ``error:`` line. The in-process tests
drive the ASGI app; those about sockets run ``seq2seq.serve`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from seq2seq import serve
from seq2seq.config import DecodeConfig
from seq2seq.decoding.translator import Translator
from seq2seq.model import bundle
from seq2seq.service.app import API_KEY_ENV
from seq2seq.service.server import RateLimit
from tests.service.test_serve import (
    BEAM,
    gated,
    make_app,
    run,
    serve_process,
    serving,
    until,
    wait_for_address,
)

KEY = "s3cret"
LIMIT = 4096  # max_body_bytes of the apps and the server here
WAIT = 20.0  # seconds a socket waits before the test counts the server as hung
CHUNK = b"x" * 1024


@pytest.fixture(scope="module")
def translator(tiny_bundle) -> Translator:
    return Translator.from_bundle(tiny_bundle, decode=DecodeConfig(beam_size=BEAM), device="cpu")


# ------------------------------------------------------------- a bad line fails alone


def test_a_lone_surrogate_fails_only_its_own_request(translator, tiny_bundle, pairs):
    """The bad request waits in the queue with legitimate ones, behind a running
    search, so without the check it would share their batch."""
    slow = gated(translator)
    sentences = [s for s, _ in pairs[:12]]
    bad = b'{"q": ["a good line", "\\ud800"]}'

    async def scenario():
        app = make_app(slow, tiny_bundle, max_wait_ms=10_000, max_batch_sentences=1000)
        async with serving(app) as client:
            first = asyncio.create_task(client.post("/translate", json={"q": sentences[0]}))
            await until(lambda: _searching(client), "the first search started")
            posts = [client.post("/translate", json={"q": s}) for s in sentences[1:6]]
            posts.append(client.post("/translate", content=bad, headers=JSON))
            posts += [client.post("/translate", json={"q": s}) for s in sentences[6:]]
            tasks = [asyncio.create_task(post) for post in posts]
            await until(lambda: _queued(client, len(sentences) - 1), "the rest queued")
            slow.gate.set()
            return [await first] + [await task for task in tasks]

    replies = run(scenario)
    refused = replies.pop(6)
    assert refused.status_code == 422 and refused.json()["error"], refused.text
    assert [r.status_code for r in replies] == [200] * len(sentences)
    texts = [r.json()["translations"][0]["text"] for r in replies]
    assert texts == translator.translate(sentences)


JSON = {"content-type": "application/json"}


async def _searching(client: httpx.AsyncClient) -> bool:
    return (await client.get("/info")).json()["stats"]["requests"] >= 1


async def _queued(client: httpx.AsyncClient, sentences: int) -> bool:
    return (await client.get("/info")).json()["stats"]["waiting"] >= sentences


# --------------------------------------------------- key and body before the body is read


class Client:
    """An ASGI client that sends a chunked body one message at a time and counts
    how many messages the app took."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.taken = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.taken += 1
        if self.taken > self.chunks:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": CHUNK, "more_body": self.taken < self.chunks}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")


def _post_scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/translate",
        "raw_path": b"/translate",
        "query_string": b"",
        "root_path": "",
        "server": ("test", 80),
        "client": ("test", 1234),
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"20"),  # a lie: the body is chunked
            (b"transfer-encoding", b"chunked"),
            *headers,
        ],
    }


@pytest.mark.parametrize("keyed", [False, True])
def test_a_chunked_body_is_read_only_up_to_the_limit(translator, tiny_bundle, keyed):
    app = make_app(translator, tiny_bundle, max_body_bytes=LIMIT, api_key=KEY if keyed else None)
    client = Client(chunks=1000)
    auth = [(b"authorization", f"Bearer {KEY}".encode())] if keyed else []
    asyncio.run(app(_post_scope(*auth), client.receive, client.send))
    assert client.status == 413
    assert client.taken <= LIMIT // len(CHUNK) + 1  # the rest was never read


@pytest.mark.parametrize(("auth", "status"), [(None, 401), (b"Bearer wrong", 403)])
def test_a_keyed_server_refuses_before_reading_the_body(translator, tiny_bundle, auth, status):
    app = make_app(translator, tiny_bundle, api_key=KEY)
    client = Client(chunks=1000)
    headers = [(b"authorization", auth)] if auth else []
    asyncio.run(app(_post_scope(*headers), client.receive, client.send))
    assert client.status == status and client.taken == 0


# ----------------------------------------------------------------------- the page


@pytest.fixture
def hostile_bundle(tiny_bundle, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny bundle whose config names a script as the source language
    and asks for the API key as the target language."""
    copy = tmp_path / "hostile"
    copy.mkdir()
    for item in tiny_bundle.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    config = (copy / bundle.CONFIG).read_text()
    config = re.sub(r"src_lang: .*", "src_lang: '</title><script>alert(1)</script>'", config)
    config = re.sub(r"tgt_lang: .*", "tgt_lang: ${oc.env:" + API_KEY_ENV + "}", config)
    (copy / bundle.CONFIG).write_text(config)
    monkeypatch.setenv(API_KEY_ENV, "the-secret-value")
    return copy


def _page_or_refusal(translator: Translator, path: Path) -> str | None:
    """The page, or None when the bundle was refused at load."""
    try:
        app = make_app(translator, path)
    except bundle.BundleError:
        return None

    async def scenario():
        async with serving(app) as client:
            return await client.get("/")

    return run(scenario).text


def test_the_page_shows_bundle_strings_as_text(translator, hostile_bundle):
    page = _page_or_refusal(translator, hostile_bundle)
    if page is not None:
        assert "<script>alert" not in page
        assert "&lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_bundle_config_never_reads_the_environment(translator, hostile_bundle):
    page = _page_or_refusal(translator, hostile_bundle)
    assert page is None or "the-secret-value" not in page


# ------------------------------------------------------------------ one error shape


def test_every_refusal_is_one_error_shape(translator, tiny_bundle):
    async def scenario():
        async with serving(make_app(translator, tiny_bundle)) as client:
            return [
                await client.get("/no/such/page"),
                await client.get("/translate"),
                await client.post("/translate", content=b"{", headers=JSON),
                await client.head("/"),
            ]

    missing, wrong_method, malformed, head = run(scenario)
    assert missing.status_code == 404 and "/no/such/page" in missing.json()["error"]
    assert wrong_method.status_code == 405 and "POST" in wrong_method.json()["error"]
    assert wrong_method.headers["allow"] == "POST"
    assert malformed.status_code == 422 and "malformed JSON" in malformed.json()["error"]
    assert head.status_code == 200 and head.content == b""


def test_an_unexpected_failure_is_a_500_in_the_error_shape(translator, tiny_bundle):
    app = make_app(translator, tiny_bundle)

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)

    async def scenario():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/broken")

    reply = run(scenario)
    assert reply.status_code == 500 and "internal error" in reply.json()["error"]


# ------------------------------------------------------------------ /docs offline


LINK = r"""(?:src|href)=["']([^"']+)["']|url: *["']([^"']+)["']"""


def test_docs_load_from_the_server_alone(translator, tiny_bundle):
    async def scenario():
        async with serving(make_app(translator, tiny_bundle, api_key=KEY)) as client:
            page = await client.get("/docs")
            links = re.findall(LINK, page.text)
            assets = [await client.get(a or b) for a, b in links]
            return page, assets

    page, assets = run(scenario)
    assert page.status_code == 200
    assert not re.search(r"https?://", page.text), "the page names another host"
    assert len(assets) >= 3 and all(a.status_code == 200 and a.content for a in assets)


# ---------------------------------------------------------------- the app's settings


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("timeout=nan", "timeout=nan"),
        ("port=70000", "port=70000"),
        ("log_level=bogus", "log_level='bogus'"),
        ("header_timeout=0", "header_timeout=0"),
        ("max_connections=0", "max_connections=0"),
    ],
)
def test_bad_server_settings_are_one_error_line(run_app, arg, message):
    code, _, err = run_app(serve.main, "model=x", arg)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("setting", ["timeout", "body_timeout", "header_timeout"])
def test_a_nan_setting_is_refused_by_the_app_too(translator, tiny_bundle, setting):
    with pytest.raises(ValueError, match=f"{setting}=nan"):
        make_app(translator, tiny_bundle, **{setting: float("nan")})


def test_a_connection_cap_above_the_open_file_limit_is_refused(monkeypatch):
    monkeypatch.setattr(serve.resource, "getrlimit", lambda _: (256, 256))
    with pytest.raises(ValueError, match="max_connections=512 needs"):
        serve.reserve_descriptors(512)


def test_identical_log_lines_are_rate_limited():
    now = [0.0]
    limit = RateLimit(10.0, clock=lambda: now[0])
    logger = logging.getLogger("tests.flood")

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.ERROR, __file__, 1, msg, (), None)

    flood = [record(f"socket.accept() out of system resource\nsocket fd={i}") for i in range(1000)]
    assert sum(limit.filter(r) for r in flood) == 1
    assert limit.filter(record("another problem"))
    now[0] = 11.0
    late = record("socket.accept() out of system resource\nsocket fd=5")
    assert limit.filter(late) and "999 more" in late.getMessage()


# ---------------------------------------------------------------- over the wire


@pytest.fixture(scope="module")
def server(tiny_bundle) -> Iterator[str]:
    process = serve_process(
        f"model={tiny_bundle}",
        "port=0",
        f"api_key={KEY}",
        f"decode.beam_size={BEAM}",
        f"max_body_bytes={LIMIT}",
        "header_timeout=2",
        "body_timeout=2",
        "max_connections=4",
    )
    try:
        yield wait_for_address(process)
    finally:
        process.kill()
        process.wait(30)


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return socket.create_connection((parts.hostname, parts.port), timeout=WAIT)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one response (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed without answering: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(head.split()[1]), body


def _chunked_head(key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        "POST /translate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: 20\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()


def _chunks(count: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK) for _ in range(count))


@pytest.mark.slow
@pytest.mark.parametrize(("key", "status"), [(KEY, 413), (None, 401)])
def test_the_server_answers_while_the_client_still_has_chunks_to_send(server, key, status):
    """The body is never finished: an answer at all means the server stopped reading."""
    with connect(server) as sock:
        sock.sendall(_chunked_head(key) + _chunks(LIMIT // len(CHUNK) + 2))
        code, body = read_response(sock)
    assert code == status and b'"error"' in body


@pytest.mark.slow
def test_a_refused_body_is_not_read_on(server):
    """After a refusal the connection closes: the rest of the body is never read
    (64 MiB more would all be taken, and thrown away, by a server that reads on)."""
    with connect(server) as sock:
        sock.sendall(_chunked_head(None) + _chunks(1))
        code, _ = read_response(sock)
        assert code == 401
        more = _chunks(1024)
        with pytest.raises(OSError):  # the server has closed: reset, broken pipe
            for _ in range(64):
                sock.sendall(more)


@pytest.mark.slow
def test_a_client_stalled_mid_head_is_disconnected(server):
    with connect(server) as sock:
        sock.sendall(b"POST /translate HTTP/1.1\r\nHost: test\r\n")
        assert sock.recv(1024) == b""


@pytest.mark.slow
def test_a_client_stalled_mid_body_gets_408(server):
    with connect(server) as sock:
        head = f"POST /translate HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
        sock.sendall(head.encode() + b'Content-Length: 100\r\n\r\n{"q": ')
        code, body = read_response(sock)
    assert code == 408 and b"body_timeout" in body


@pytest.mark.slow
def test_a_malformed_request_is_400_in_the_error_shape(server):
    with connect(server) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        code, body = read_response(sock)
    assert code == 400 and b'"error"' in body


@pytest.mark.slow
def test_connections_beyond_the_cap_are_refused_at_once(server):
    held = [connect(server) for _ in range(4)]
    try:
        with connect(server) as extra:  # answered before it has asked anything
            code, body = read_response(extra)
            assert code == 503 and b"too many connections" in body
            assert extra.recv(1024) == b""
    finally:
        for sock in held:
            sock.close()
    for _ in range(100):
        try:
            if httpx.get(f"{server}/health", timeout=WAIT).status_code == 200:
                return
        except httpx.TransportError:
            pass
        threading.Event().wait(0.05)
    raise AssertionError("the server never took connections again")


@pytest.mark.slow
def test_sigterm_with_a_stalled_client_exits_within_the_drain_bound(tiny_bundle):
    process = serve_process(f"model={tiny_bundle}", "port=0", "drain_timeout=1", "body_timeout=600")
    try:
        url = wait_for_address(process)
        with connect(url) as sock:
            sock.sendall(b"POST /translate HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
            assert httpx.get(f"{url}/health", timeout=WAIT).status_code == 200
            process.send_signal(signal.SIGTERM)
            code = process.wait(WAIT)
    finally:
        process.kill()
    assert code in (0, -signal.SIGTERM)
