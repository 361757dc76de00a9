"""The service's web page in a real browser: headless Chromium against a live server.

Chromium is driven through its DevTools protocol over ``--remote-debugging-pipe``
(JSON messages ending in NUL on file descriptors 3 and 4), so no extra package is
needed. The test types a sentence, clicks Translate, reads the translation and the
heatmap from the DOM, compares them with the API's answer and saves a screenshot.
Skips where Debian's ``chromium`` is not installed.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.service.test_serve import BEAM, serve_process, wait_for_address

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
    ),
]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
    "--window-size=1000,900",
]
WAIT = 60.0  # seconds before a step counts as hung


def _high(fd: int) -> int:
    """A copy of ``fd`` numbered 10 or above, so moving it to 3 or 4 clobbers nothing."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return copy


class Browser:
    """Headless Chromium and one page, spoken to over the DevTools pipe."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._to_chrome = map(_high, os.pipe())
        self._from_chrome, from_chrome_w = map(_high, os.pipe())

        def child_fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        assert CHROMIUM is not None
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=child_fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=(profile / "chromium.log").open("wb"),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._messages: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._ids = iter(range(1, 1_000_000))
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for message in messages:
                    self._messages.put(json.loads(message))

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its result (events seen meanwhile are kept)."""
        number = next(self._ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            reply = self._messages.get(timeout=WAIT)
            if reply.get("id") == number:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)
        raise AssertionError(f"no answer to {method}")

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.events.clear()
        self.page("Page.enable")
        self.page("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def wait_for(self, expression: str) -> None:
        deadline = time.monotonic() + WAIT
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.page(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def screenshot(self, path: Path) -> Path:
        shot = self.page("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError, queue.Empty):
            self.call("Browser.close")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_chrome)


@pytest.fixture(scope="module")
def server(tiny_bundle) -> Iterator[str]:
    process = serve_process(f"model={tiny_bundle}", "port=0", f"decode.beam_size={BEAM}")
    try:
        yield wait_for_address(process)
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture
def browser(tmp_path) -> Iterator[Browser]:
    profile = tmp_path / "profile"
    profile.mkdir()
    chrome = Browser(profile)
    try:
        yield chrome
    finally:
        chrome.close()


def api(url: str, **body: Any) -> dict[str, Any]:
    reply = httpx.post(f"{url}/translate", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["translations"][0]


def test_typed_sentence_shows_the_api_translation_and_heatmap(server, browser, pairs, tmp_path):
    sentence = pairs[3][0]
    browser.open(server + "/")
    assert browser.evaluate("document.getElementById('pair').textContent") == "en → de"
    browser.evaluate("document.getElementById('source').focus()")
    browser.page("Input.insertText", text=sentence)
    browser.click("#translate")
    browser.wait_for("['done', 'error'].includes(document.body.dataset.state)")
    assert browser.evaluate("document.getElementById('status').textContent") == ""
    shown = browser.evaluate("document.getElementById('translation-0').textContent")
    want = api(server, q=sentence, attention=True)
    assert shown == want["text"]
    att = want["attention"]
    cells = browser.evaluate("document.querySelectorAll('svg.heatmap rect.cell').length")
    assert cells == len(att["src_pieces"]) * len(att["tgt_pieces"]) > 0
    labels = browser.evaluate(
        "[...document.querySelectorAll('svg.heatmap text.src-piece')].map(t => t.textContent)"
    )
    assert labels == att["src_pieces"]
    shot = browser.screenshot(tmp_path / "page.png")
    assert shot.stat().st_size > 5000


def test_a_link_translates_with_nbest(server, browser, pairs, tmp_path):
    sentence = pairs[5][0]
    browser.open(f"{server}/?q={quote(sentence)}&beam=3&nbest=3&auto=1")
    browser.wait_for("['done', 'error'].includes(document.body.dataset.state)")
    shown = browser.evaluate(
        "[...document.querySelectorAll('.nbest li')].map(li => li.firstChild.textContent)"
    )
    want = api(server, q=sentence, beam_size=3, nbest=3)
    assert shown == [h["text"] for h in want["nbest"]]
    browser.screenshot(tmp_path / "nbest.png")
