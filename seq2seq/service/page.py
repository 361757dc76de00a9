"""The web page at ``/``: a form, n-best lists and attention heatmaps.

Why every value is escaped: the language names come from the bundle's config,
which whoever made the bundle wrote, and the page is served without a key; a name
such as ``</title><script>`` must show as text, never run.
"""

from __future__ import annotations

import html
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

__all__ = ["install_page", "render_page"]

TEMPLATE = "static/index.html"


def render_page(
    *, source: str, target: str, beam_size: int, max_beam_size: int, needs_key: bool
) -> str:
    """The page with its placeholders filled in, each value HTML-escaped."""
    template = files("seq2seq.service").joinpath(TEMPLATE).read_text(encoding="utf-8")
    values = {
        "{{SOURCE}}": source,
        "{{TARGET}}": target,
        "{{BEAM_SIZE}}": str(beam_size),
        "{{MAX_BEAM_SIZE}}": str(max_beam_size),
        "{{NEEDS_KEY}}": "true" if needs_key else "false",
    }
    for name, value in values.items():
        template = template.replace(name, html.escape(value, quote=True))
    return template


def install_page(app: FastAPI, page: str) -> None:
    """Serve ``page`` at ``/`` for GET and HEAD (monitors probe with HEAD)."""

    async def show(_: Request) -> HTMLResponse:
        return HTMLResponse(page)

    # A plain Starlette route: it answers HEAD wherever it answers GET.
    app.router.add_route("/", show, methods=["GET"], include_in_schema=False)
