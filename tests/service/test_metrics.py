"""``GET /metrics``: Prometheus' text format, with counters that add up after a
scripted exchange, on a registry of the app's own."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from seq2seq.config import DecodeConfig
from seq2seq.decoding.translator import Translator
from tests.service.test_batcher import BEAM, counts, make_app, serving, stepped, until


@pytest.fixture(scope="module")
def translator(tiny_bundle) -> Translator:
    return Translator.from_bundle(tiny_bundle, decode=DecodeConfig(beam_size=BEAM), device="cpu")


@pytest.fixture(scope="module")
def lines(pairs) -> list[str]:
    return [s for s, _ in pairs[:5]]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_add_up_after_an_exchange(translator, tiny_bundle, lines):
    """Three translated requests (five lines), an invalid one (422), one over the line
    limit (413) and one refused by a full queue (503)."""
    slow = stepped(translator)
    app = make_app(slow, tiny_bundle, workers=1, max_queue=2, max_batch_sentences=2, max_lines=3)

    async def scenario():
        async with serving(app) as client:
            before = (await client.get("/metrics")).text
            first = asyncio.create_task(client.post("/translate", json={"q": lines[:2]}))
            await until(lambda: counts(client, requests=1, waiting=0), "searching")
            statuses = [
                (await client.post("/translate", json={"q": 5})).status_code,
                (await client.post("/translate", json={"q": ["a", "b", "c", "d"]})).status_code,
            ]
            second = asyncio.create_task(client.post("/translate", json={"q": lines[2:4]}))
            await until(lambda: counts(client, requests=2, waiting=2), "queue full")
            during = (await client.get("/metrics")).text
            statuses.append((await client.post("/translate", json={"q": "x"})).status_code)
            slow.steps.open()
            statuses += [(await t).status_code for t in (first, second)]
            statuses.append((await client.post("/translate", json={"q": lines[4]})).status_code)
            reply = await client.get("/metrics")
            return before, during, statuses, reply, await client.get("/info")

    before, during, statuses, reply, info = asyncio.run(scenario())
    assert statuses == [422, 413, 503, 200, 200, 200]
    assert reply.headers["content-type"].startswith("text/plain")
    start, mid, end = samples(before), samples(during), samples(reply.text)
    assert value(start, "seq2seq_requests_total", status="200") == 0
    assert value(mid, "seq2seq_queue_sentences") == 2
    assert value(mid, "seq2seq_live_sentences") == 2
    assert value(mid, "seq2seq_live_searches") == 1
    for status, count in (("200", 3), ("503", 1), ("422", 1), ("413", 1)):
        assert value(end, "seq2seq_requests_total", status=status) == count
        assert value(end, "seq2seq_answer_seconds_count", status=status) == count
    assert value(end, "seq2seq_sentences_total", status="translated") == 5
    # refused at the door, before its body (and so its lines) was read
    assert value(end, "seq2seq_sentences_total", status="rejected") == 0
    assert value(end, "seq2seq_queue_sentences") == 0
    assert value(end, "seq2seq_live_sentences") == 0
    for name in ("queue_wait", "search", "total"):
        assert value(end, f"seq2seq_{name}_seconds_count") == 3
    stats = info.json()["stats"]
    assert value(end, "seq2seq_live_batch_sentences_count") == stats["steps"] > 0
    assert value(end, "seq2seq_live_batch_sentences_bucket", le="2.0") == stats["steps"]


def test_two_apps_in_one_process_count_apart(translator, tiny_bundle, lines):
    first, second = make_app(translator, tiny_bundle), make_app(translator, tiny_bundle)

    async def scenario():
        async with serving(first) as a, serving(second) as b:
            await a.post("/translate", json={"q": lines[0]})
            return (await a.get("/metrics")).text, (await b.get("/metrics")).text

    used, unused = asyncio.run(scenario())
    assert value(samples(used), "seq2seq_requests_total", status="200") == 1
    assert value(samples(unused), "seq2seq_requests_total", status="200") == 0
