"""Load test for ``seq2seq-serve``, and the in-process figures to compare it with.

Three modes::

    # N clients, each sending one request at a time, for a fixed time (or request count)
    python scripts/load_test.py load --url http://127.0.0.1:8000 --sentences test.en.gz \\
        --clients 32 --duration 30 [--max-requests 20000] [--beam-size 5] [--json out.json]

    # a burst far beyond the queue, then normal load: 503s, recovery, nothing unanswered
    # (a client waits a 503's Retry-After before it sends again; --ignore-retry-after
    # resends at once); the server's own time to each answer is reported too
    python scripts/load_test.py overload --url ... --sentences ... --burst-clients 256 \\
        --clients 32 --duration 15

    # the same sentences translated in this process: sentences/s of one
    # Translator.translate call over all of them (what seq2seq-translate does), and
    # the latency of translating one sentence alone
    python scripts/load_test.py baseline --model BUNDLE --sentences ... [--beam-size 5]

Every client request gets an answer or is counted as unanswered (connection error or
client timeout); the report gives requests/s, sentences/s, p50/p95/p99 latency and
the counts of 200/503/504/other answers, and beside the wall throughput the server
process's CPU-seconds per translated sentence (its user + system time read with
psutil before and after the phase; the process is the one listening on the URL's
port, or ``--server-pid``), which stays readable when the load generator shares
the machine. The baseline reports its own CPU-seconds per sentence likewise. Only
servers on this machine are accepted (127.0.0.1, ::1 or localhost). Results print
as JSON lines (``--json`` appends them to a file too).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil

LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass
class Outcome:
    """What the clients saw in one phase."""

    clients: int
    seconds: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)  # by status, seconds
    statuses: dict[str, int] = field(default_factory=dict)
    sentences: int = 0  # translated (status 200)
    sent: int = 0
    unanswered: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # why, for unanswered requests

    def record(self, status: int | str, latency: float, sentences: int) -> None:
        """One request's fate: an HTTP status, or the name of the client error."""
        self.sent += 1
        if isinstance(status, str):
            self.unanswered += 1
            self.errors[status] = self.errors.get(status, 0) + 1
            return
        name = str(status) if status in (200, 503, 504) else "other"
        self.latencies.setdefault(name, []).append(latency)
        self.statuses[name] = self.statuses.get(name, 0) + 1
        if status == 200:
            self.sentences += sentences

    def report(self, phase: str) -> dict[str, object]:
        ok = self.statuses.get("200", 0)
        answered = [t for times in self.latencies.values() for t in times]
        return {
            "phase": phase,
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": self.sent,
            "requests_per_s": round(self.sent / self.seconds, 2),
            "ok_per_s": round(ok / self.seconds, 2),
            "sentences_per_s": round(self.sentences / self.seconds, 2),
            **{f"p{q}_ms": _percentile(answered, q) for q in (50, 95, 99)},
            "p50_ms_by_status": {k: _percentile(v, 50) for k, v in sorted(self.latencies.items())},
            "status": dict(sorted(self.statuses.items())),
            "unanswered": self.unanswered,
            "errors": dict(sorted(self.errors.items())),
            "all_answered": self.unanswered == 0,
        }


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return round(ordered[index] * 1000, 2)


def read_sentences(path: str, limit: int) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def check_local(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        sys.exit(f"error: --url must point at this machine ({', '.join(LOCAL_HOSTS)}), not {host}")
    return url.rstrip("/")


# ------------------------------------------------------------------------------ clients


@dataclass(frozen=True)
class Phase:
    """How the clients behave during one phase."""

    clients: int
    duration: float  # seconds
    max_requests: int
    per_request: int  # lines per request
    body: dict[str, object]  # request fields besides q
    timeout: float  # seconds a client waits for an answer
    headers: dict[str, str]
    # A client that got 503 waits its Retry-After before the next request, as a
    # well-behaved client does; without it the burst measures how fast this one
    # process can resend, not how fast the server refuses.
    honour_retry_after: bool = False


async def run_phase(url: str, sentences: list[str], phase: Phase) -> Outcome:
    """``phase.clients`` loops, each posting one request and waiting for its answer, until
    ``duration`` seconds or ``max_requests`` requests; then every open request is awaited."""
    outcome = Outcome(clients=phase.clients)
    size = phase.per_request
    chunks = itertools.cycle([sentences[i : i + size] for i in range(0, len(sentences), size)])
    budget = itertools.count()
    limits = httpx.Limits(max_connections=phase.clients, max_keepalive_connections=phase.clients)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=phase.timeout, headers=phase.headers
    ) as client:
        start = time.perf_counter()
        end = start + phase.duration

        async def one_client() -> None:
            while time.perf_counter() < end and next(budget) < phase.max_requests:
                lines = next(chunks)
                sent = time.perf_counter()
                wait = 0.0
                try:
                    reply = await client.post("/translate", json={"q": lines, **phase.body})
                    status: int | str = reply.status_code
                    if status == 503 and phase.honour_retry_after:
                        wait = float(reply.headers.get("retry-after", 1))
                except httpx.HTTPError as e:
                    status = type(e).__name__
                outcome.record(status, time.perf_counter() - sent, len(lines))
                if wait:
                    await asyncio.sleep(min(wait, max(0.0, end - time.perf_counter())))

        await asyncio.gather(*(one_client() for _ in range(phase.clients)))
        outcome.seconds = time.perf_counter() - start
    return outcome


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _phase(args: argparse.Namespace, clients: int, duration: float) -> Phase:
    return Phase(
        honour_retry_after=not getattr(args, "ignore_retry_after", True),
        clients=clients,
        duration=duration,
        max_requests=args.max_requests,
        per_request=args.lines_per_request,
        body={"beam_size": args.beam_size} if args.beam_size else {},
        timeout=args.client_timeout,
        headers=_headers(args),
    )


async def server_stats(url: str, headers: dict[str, str]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        return (await client.get("/info")).json().get("stats", {})


async def answer_times(url: str, headers: dict[str, str]) -> dict[str, dict[str, int]]:
    """The server's own count of answers by status within each time bound (its
    ``seq2seq_answer_seconds`` histogram): the time from a request reaching the app
    to its answer, without the wait to be accepted or the client's own delays."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        text = (await client.get("/metrics")).text
    found: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "seq2seq_answer_seconds_bucket":
                by_bound = found.setdefault(sample.labels["status"], {})
                by_bound[sample.labels["le"]] = int(sample.value)
    return found


def answers_within(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict:
    """Per status, answers of the phase within each bound (seconds), cumulative."""
    return {
        status: {le: n - before.get(status, {}).get(le, 0) for le, n in bounds.items()}
        for status, bounds in after.items()
    }


def emit(record: dict[str, object], args: argparse.Namespace) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if args.json:
        with Path(args.json).open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def server_process(url: str, pid: int) -> psutil.Process:
    """The server: ``pid`` if given, else the process listening on the URL's port."""
    if pid:
        return psutil.Process(pid)
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    for conn in psutil.net_connections(kind="tcp"):
        listening = conn.status == psutil.CONN_LISTEN and conn.laddr
        if listening and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    sys.exit(f"error: no process of this user listens on port {port}; pass --server-pid")


def cpu_seconds(process: psutil.Process) -> float:
    """User + system time of the process, all its threads."""
    times = process.cpu_times()
    return float(times.user + times.system)


def cpu_per_sentence(seconds: float, sentences: int) -> float | None:
    return round(seconds / sentences, 6) if sentences else None


def cpu_efficiency(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Sentences the server searched per second of its CPU time during the phase: a
    figure that, unlike sentences/s, other jobs on a shared machine barely change."""
    cpu = float(after.get("cpu_seconds", 0)) - float(before.get("cpu_seconds", 0))
    done = int(after.get("sentences", 0)) - int(before.get("sentences", 0))
    return round(done / cpu, 2) if cpu > 0 else None


async def load(args: argparse.Namespace) -> None:
    url = check_local(args.url)
    sentences = read_sentences(args.sentences, args.limit)
    if args.warmup > 0:
        await run_phase(url, sentences, _phase(args, args.clients, args.warmup))
    server = server_process(url, args.server_pid)
    before = await server_stats(url, _headers(args))
    cpu = cpu_seconds(server)
    outcome = await run_phase(url, sentences, _phase(args, args.clients, args.duration))
    cpu = cpu_seconds(server) - cpu
    record = outcome.report("load")
    record["server"] = after = await server_stats(url, _headers(args))
    record["server_sentences_per_cpu_s"] = cpu_efficiency(before, after)
    record["server_cpu_s"] = round(cpu, 3)
    record["server_cpu_s_per_sentence"] = cpu_per_sentence(cpu, outcome.sentences)
    emit({**record, "label": args.label}, args)


async def overload(args: argparse.Namespace) -> None:
    """A burst of ``--burst-clients`` (503s expected), then ``--clients`` for recovery."""
    url = check_local(args.url)
    sentences = read_sentences(args.sentences, args.limit)
    server = server_process(url, args.server_pid)
    cpu = cpu_seconds(server)
    times = await answer_times(url, _headers(args))
    burst = await run_phase(url, sentences, _phase(args, args.burst_clients, args.burst_duration))
    spent = cpu_seconds(server) - cpu
    cpu += spent
    record = burst.report("burst")
    record["server_cpu_s_per_sentence"] = cpu_per_sentence(spent, burst.sentences)
    later = await answer_times(url, _headers(args))
    record["server_answers_within_s"] = answers_within(times, later)
    emit({**record, "label": args.label}, args)
    after = await run_phase(url, sentences, _phase(args, args.clients, args.duration))
    record = after.report("recovery")
    record["server_cpu_s_per_sentence"] = cpu_per_sentence(
        cpu_seconds(server) - cpu, after.sentences
    )
    record["server"] = await server_stats(url, _headers(args))
    emit({**record, "label": args.label}, args)


# ----------------------------------------------------------------------------- baseline


def baseline(args: argparse.Namespace) -> None:
    """Sentences/s of one ``Translator.translate`` over all sentences, and the median
    latency of one sentence translated alone, in this process."""
    import torch

    from seq2seq.config import DecodeConfig
    from seq2seq.decoding.translator import Translator

    if args.threads:
        torch.set_num_threads(args.threads)
    sentences = read_sentences(args.sentences, args.limit)
    decode = DecodeConfig(beam_size=args.beam_size or DecodeConfig.beam_size)
    translator = Translator.from_bundle(args.model, decode=decode, device="cpu")
    translator.translate(sentences[:32])  # warm up
    rates, per_cpu = [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        translator.translate(sentences)
        rates.append(len(sentences) / (time.perf_counter() - start))
        per_cpu.append(len(sentences) / (time.process_time() - cpu))
    singles = []
    for line in itertools.islice(itertools.cycle(sentences), args.single):
        start = time.perf_counter()
        translator.translate([line])
        singles.append(time.perf_counter() - start)
    emit(
        {
            "phase": "baseline",
            "label": args.label,
            "beam_size": decode.beam_size,
            "sentences": len(sentences),
            "threads": torch.get_num_threads(),
            "sentences_per_s": [round(r, 2) for r in rates],
            "sentences_per_s_median": round(statistics.median(rates), 2) if rates else None,
            "sentences_per_cpu_s": [round(r, 2) for r in per_cpu],
            "cpu_s_per_sentence": round(1 / statistics.median(per_cpu), 6) if per_cpu else None,
            "single_p50_ms": _percentile(singles, 50),
            "single_p95_ms": _percentile(singles, 95),
        },
        args,
    )


# ---------------------------------------------------------------------------------- cli


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("load", "overload", "baseline"):
        p = sub.add_parser(name)
        p.add_argument("--sentences", required=True, help="one sentence per line (.gz ok)")
        p.add_argument("--limit", type=int, default=0, help="use the first N sentences")
        p.add_argument("--beam-size", type=int, default=0, help="default: the server's")
        p.add_argument("--json", help="append the JSON report to this file")
        p.add_argument("--label", default="")
        if name == "baseline":
            p.add_argument("--model", required=True)
            p.add_argument("--repeats", type=int, default=3)
            p.add_argument("--single", type=int, default=200, help="single-sentence calls")
            p.add_argument("--threads", type=int, default=0)
            continue
        p.add_argument("--url", default="http://127.0.0.1:8000")
        p.add_argument("--api-key", default=None)
        p.add_argument("--server-pid", type=int, default=0, help="default: the port's listener")
        p.add_argument("--clients", type=int, default=32)
        p.add_argument("--duration", type=float, default=30.0, help="seconds")
        p.add_argument("--max-requests", type=int, default=100_000)
        p.add_argument("--lines-per-request", type=int, default=1)
        p.add_argument("--client-timeout", type=float, default=120.0, help="seconds")
        p.add_argument("--warmup", type=float, default=3.0, help="seconds, load mode")
        if name == "overload":
            p.add_argument("--burst-clients", type=int, default=256)
            p.add_argument("--burst-duration", type=float, default=15.0)
            p.add_argument(
                "--ignore-retry-after",
                action="store_true",
                help="resend at once after a 503 instead of waiting its Retry-After",
            )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.mode == "baseline":
        baseline(args)
    else:
        asyncio.run(load(args) if args.mode == "load" else overload(args))


if __name__ == "__main__":
    main()
