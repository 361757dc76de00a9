"""The service's web pages in a real browser: headless Chromium against a live server.

Playwright drives Debian's Chromium (``executable_path``; Playwright's own browser
downloads are never used). The tests type a sentence, click Translate, read the
translation, n-best list and heatmap from the DOM and compare them with the API's
answer; and load ``/docs`` with every request to another host refused. Skips where
Chromium or Playwright is not installed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.service.test_serve import BEAM, serve_process, wait_for_address

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")


def _chromium() -> str | None:
    """Debian's browser binary (the ``chromium`` on PATH is a shell wrapper)."""
    binary = Path("/usr/lib/chromium/chromium")
    if binary.is_file():
        return str(binary)
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM = _chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
    ),
]
WAIT_MS = 60_000  # before a step counts as hung
DONE = "['done', 'error'].includes(document.body.dataset.state)"


@pytest.fixture(scope="module")
def server(tiny_bundle) -> Iterator[str]:
    process = serve_process(f"model={tiny_bundle}", "port=0", f"decode.beam_size={BEAM}")
    try:
        yield wait_for_address(process)
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One browser for the module; Playwright's event loop ends with it."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            browser.close()


class Offline:
    """A page whose requests to any host but the server are refused and recorded."""

    def __init__(self, chromium: Any, server: str) -> None:
        self.context = chromium.new_context(viewport={"width": 1000, "height": 900})
        self.context.set_default_timeout(WAIT_MS)
        self.elsewhere: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.server = server

    def _route(self, route: Any) -> None:
        if route.request.url.startswith(self.server + "/"):
            route.continue_()
        else:
            self.elsewhere.append(route.request.url)
            route.abort()


@pytest.fixture
def offline(chromium, server) -> Iterator[Offline]:
    browser = Offline(chromium, server)
    try:
        yield browser
    finally:
        browser.context.close()


def api(url: str, **body: Any) -> dict[str, Any]:
    reply = httpx.post(f"{url}/translate", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["translations"][0]


def test_typed_sentence_shows_the_api_translation_and_heatmap(server, offline, pairs, tmp_path):
    sentence = pairs[3][0]
    page = offline.page
    page.goto(server + "/")
    assert page.text_content("#pair") == "en → de"
    page.locator("#source").fill(sentence)
    page.click("#translate")
    page.wait_for_function(DONE)
    assert page.text_content("#status") == ""
    want = api(server, q=sentence, attention=True)
    assert page.text_content("#translation-0") == want["text"]
    att = want["attention"]
    cells = page.locator("svg.heatmap rect.cell").count()
    assert cells == len(att["src_pieces"]) * len(att["tgt_pieces"]) > 0
    assert page.locator("svg.heatmap text.src-piece").all_text_contents() == att["src_pieces"]
    shot = tmp_path / "page.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 5000
    assert offline.elsewhere == []


def test_a_link_translates_with_nbest(server, offline, pairs, tmp_path):
    sentence = pairs[5][0]
    page = offline.page
    page.goto(f"{server}/?q={quote(sentence)}&beam=3&nbest=3&auto=1")
    page.wait_for_function(DONE)
    shown = page.evaluate(
        "[...document.querySelectorAll('.nbest li')].map(li => li.firstChild.textContent)"
    )
    want = api(server, q=sentence, beam_size=3, nbest=3)
    assert shown == [h["text"] for h in want["nbest"]]
    page.screenshot(path=tmp_path / "nbest.png", full_page=True)


def test_the_api_docs_render_without_other_hosts(server, offline):
    page = offline.page
    page.goto(server + "/docs")
    page.wait_for_selector(".opblock-summary-path")
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert "/translate" in paths
    assert offline.elsewhere == []
