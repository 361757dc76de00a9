"""Live batching in the service: requests enter a running search at later steps and
leave when their lines finish, with the translations searching them alone gives;
decoding settings never share a search; a full queue refuses at once.

The search is driven step by step from the test (`Stepped`): a step runs only when
the test releases it, so which step a request joins at is set by the test, not by
timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest

from seq2seq.config import DecodeConfig
from seq2seq.decoding.translator import TextHypothesis, Translator
from seq2seq.service import api
from tests.service.test_serve import BEAM, make_app, serving


@dataclass
class Steps:
    """Shared by a translator and the live batches it makes: permits to step, the
    steps taken, and the decoding settings of the requests each batch took in."""

    permits: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    taken: int = 0
    settings: list[set[Any]] = field(default_factory=list)

    def release(self, n: int = 1) -> None:
        if n > 0:
            self.permits.release(n)

    def open(self) -> None:
        self.permits.release(100_000)


class Stepped(Translator):
    """A translator whose live batches step only when the test releases a step."""

    steps: Steps

    def with_decode(self, **changes: Any) -> Stepped:
        other = Stepped(self.model, self.tokenizer, replace(self.decode, **changes), device="cpu")
        other.steps = self.steps
        return other

    def live(self, *, attention: bool) -> Any:
        keys: set[Any] = set()
        self.steps.settings.append(keys)
        return SteppedLive(super().live(attention=attention), self.steps, keys)


class SteppedLive:
    def __init__(self, live: Any, steps: Steps, keys: set[Any]) -> None:
        self.live, self.steps, self.keys = live, steps, keys

    @property
    def size(self) -> int:
        return self.live.size

    @property
    def pieces(self) -> int:
        return self.live.pieces

    def add(self, sources: Any, tags: Any) -> None:
        self.keys.update(job.key for job, _ in tags)
        self.live.add(sources, tags)

    def step(self) -> Any:
        assert self.steps.permits.acquire(timeout=60), "the test never released a step"
        found = self.live.step()
        self.steps.taken += 1
        return found


@pytest.fixture(scope="module")
def translator(tiny_bundle) -> Translator:
    return Translator.from_bundle(tiny_bundle, decode=DecodeConfig(beam_size=BEAM), device="cpu")


def stepped(translator: Translator) -> Stepped:
    result = Stepped(translator.model, translator.tokenizer, translator.decode, device="cpu")
    result.steps = Steps()
    return result


@pytest.fixture(scope="module")
def lines(pairs) -> list[str]:
    """Distinct sources of several lengths."""
    return sorted({s for s, _ in pairs}, key=len)[::12][:12]


async def until(condition: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Poll ``condition`` (bounded, so a broken service fails instead of hanging)."""
    for _ in range(2000):
        result = condition()
        if await result if isinstance(result, Awaitable) else result:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def stats(client: httpx.AsyncClient) -> dict[str, int]:
    return (await client.get("/info")).json()["stats"]


async def counts(client: httpx.AsyncClient, **wanted: int) -> bool:
    got = await stats(client)
    return all(got[name] == value for name, value in wanted.items())


def assert_answer(answer: dict[str, Any], want: list[TextHypothesis], nbest: int, attention: bool):
    """A service answer equals the one-at-a-time n-best list (texts byte for byte)."""
    assert answer["text"] == want[0].text
    assert answer["score"] == pytest.approx(want[0].score, rel=1e-5, abs=1e-6)
    if nbest > 1:
        assert [h["text"] for h in answer["nbest"]] == [h.text for h in want]
        got_scores = [h["score"] for h in answer["nbest"]]
        assert got_scores == pytest.approx([h.score for h in want], rel=1e-5, abs=1e-6)
    if attention:
        att = answer["attention"]
        assert att["src_pieces"] == list(want[0].src_pieces)
        assert att["tgt_pieces"] == list(want[0].tgt_pieces)
        assert want[0].attention is not None
        flat = [w for row in want[0].attention.tolist() for w in row]
        assert [w for row in att["weights"] for w in row] == pytest.approx(flat, abs=2e-4)


SETTINGS = [(1, 1, False), (1, 1, True), (3, 1, False), (3, 3, True)]


@pytest.mark.parametrize(("beam", "nbest", "attention"), SETTINGS)
def test_requests_entering_a_running_search_translate_as_alone(
    translator, tiny_bundle, lines, beam, nbest, attention
):
    """Requests join one live batch after steps 0, 3, 6 and 10 (while earlier ones are
    still searched) and leave as their lines finish; every line's answer equals
    translating it alone."""
    slow = stepped(translator)
    app = make_app(slow, tiny_bundle, workers=1, max_batch_sentences=64)
    groups = [lines[0:3], lines[3:4], lines[4:8], lines[8:12]]
    joins = [0, 2, 5, 9]  # steps taken before each request arrives
    body = {"beam_size": beam, "nbest": nbest, "attention": attention}

    async def scenario():
        async with serving(app) as client:
            tasks = []
            for i, (group, step) in enumerate(zip(groups, joins, strict=True)):
                slow.steps.release(step - slow.steps.taken)
                await until(lambda s=step: slow.steps.taken == s, f"step {step}")
                post = client.post("/translate", json={"q": group, **body})
                tasks.append(asyncio.create_task(post))
                await until(lambda n=i + 1: counts(client, requests=n), "queued")
                if i:  # the search, held in a step, takes the request in after it
                    slow.steps.release()
                await until(lambda n=i + 1: counts(client, requests=n, waiting=0), "entered")
                assert not any(t.done() for t in tasks)  # all still being searched
            slow.steps.open()
            return [await t for t in tasks], await stats(client)

    replies, counters = asyncio.run(scenario())
    alone = translator.with_decode(beam_size=beam, nbest=nbest)
    for group, reply in zip(groups, replies, strict=True):
        assert reply.status_code == 200, reply.text
        for line, answer in zip(group, reply.json()["translations"], strict=True):
            want = alone.hypotheses([line], attention=attention)[0]
            assert_answer(answer, want, nbest, attention)
    assert counters["batches"] == 1  # one live batch served all four requests
    assert counters["largest_batch"] > max(len(g) for g in groups)  # they shared steps
    assert counters["sentences"] == len(lines)


def test_decode_settings_never_share_a_search(translator, tiny_bundle, lines):
    """Requests with five settings arrive while a search is held; each live batch
    takes in one setting only, and every answer equals translating the line alone."""
    slow = stepped(translator)
    app = make_app(slow, tiny_bundle, workers=2, max_wait_ms=0)
    settings = [
        {"beam_size": 1},
        {"beam_size": 1, "attention": True},
        {"beam_size": 3},
        {"beam_size": 3, "nbest": 2},
        {"beam_size": 2},
    ]
    posts = [(line, setting) for i, line in enumerate(lines) for setting in settings[i % 3 :]]

    async def scenario():
        async with serving(app) as client:
            tasks = [
                asyncio.create_task(client.post("/translate", json={"q": line, **setting}))
                for line, setting in posts
            ]
            await until(lambda: counts(client, requests=len(posts)), "all arrived")
            slow.steps.open()
            return [await t for t in tasks]

    replies = asyncio.run(scenario())
    for (line, setting), reply in zip(posts, replies, strict=True):
        assert reply.status_code == 200, reply.text
        beam, nbest = setting["beam_size"], setting.get("nbest", 1)
        attention = setting.get("attention", False)
        want = translator.with_decode(beam_size=beam, nbest=nbest).hypotheses(
            [line], attention=attention
        )[0]
        assert_answer(reply.json()["translations"][0], want, nbest, attention)
    searched = [keys for keys in slow.steps.settings if keys]
    assert all(len(keys) == 1 for keys in searched), searched
    assert len({key for keys in searched for key in keys}) == len(settings)


def test_a_full_queue_refuses_before_the_running_search_ends(translator, tiny_bundle):
    """A search is held mid-way while one request waits: further requests are refused
    with 503 and Retry-After while the search is still held (the refusal does not
    wait for it), before their bodies are read; the accepted ones finish once it
    goes on."""
    slow = stepped(translator)
    app = make_app(slow, tiny_bundle, workers=1, max_queue=1, max_batch_sentences=1)

    async def scenario():
        async with serving(app) as client:
            running = asyncio.create_task(client.post("/translate", json={"q": "a b c"}))
            await until(lambda: counts(client, requests=1, waiting=0), "search running")
            slow.steps.release(2)
            await until(lambda: slow.steps.taken == 2, "two steps")
            queued = asyncio.create_task(client.post("/translate", json={"q": "d e"}))
            await until(lambda: counts(client, requests=2, waiting=1), "one waiting")
            refused = await client.post("/translate", json={"q": "f"})
            unread = await client.post(  # refused before its body is read or parsed
                "/translate", content=b'{"q": ', headers={"content-type": "application/json"}
            )
            held = (slow.steps.taken, running.done(), queued.done())
            slow.steps.open()
            return [refused, unread], held, [await t for t in (running, queued)]

    refusals, held, accepted = asyncio.run(scenario())
    for refused in refusals:
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "max_queue=1" in refused.json()["error"]
    assert held == (2, False, False)
    assert [r.status_code for r in accepted] == [200, 200]


def test_a_line_the_tokenizer_refuses_fails_only_its_request(
    translator, tiny_bundle, lines, monkeypatch
):
    """Tokenizing happens per request when a search takes it in: a line SentencePiece
    cannot encode fails its own request with 422, and the requests searched beside it
    are answered. (The request check refuses lone surrogates before they queue; it is
    switched off here so that one reaches the search, as a line no check foresaw would.)"""
    monkeypatch.setattr(api, "text_problem", lambda lines: None)
    slow = stepped(translator)
    app = make_app(slow, tiny_bundle, workers=1)

    async def scenario():
        async with serving(app) as client:
            good = [
                asyncio.create_task(client.post("/translate", json={"q": line}))
                for line in lines[:4]
            ]
            await until(lambda: counts(client, requests=4), "all sent")
            slow.steps.release()  # any that came after the first step enter after it
            await until(lambda: counts(client, requests=4, waiting=0), "searching")
            bad = asyncio.create_task(
                client.post(
                    "/translate",
                    content=b'{"q": "a \\ud800 b"}',
                    headers={"content-type": "application/json"},
                )
            )
            await until(lambda: counts(client, requests=5), "the bad one queued")
            slow.steps.release()  # the search takes it in after this step
            await until(lambda: counts(client, requests=5, waiting=0), "the bad one taken")
            slow.steps.open()
            return [await t for t in good], await bad

    good, bad = asyncio.run(scenario())
    assert [r.status_code for r in good] == [200] * 4
    assert bad.status_code == 422 and "tokenized" in bad.json()["error"]
    texts = [r.json()["translations"][0]["text"] for r in good]
    assert texts == translator.translate(lines[:4])
