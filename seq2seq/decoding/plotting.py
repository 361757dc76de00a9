"""Attention heatmaps: which source pieces each target piece attended to.

Why matplotlib is imported inside the functions: it is an optional dependency
(``pip install seq2seq[plot]``), so importing this module must work without it.
Figures are drawn on an Agg canvas created per call, never through ``pyplot``:
no global figure state, no GUI backend, safe in servers and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from seq2seq.runtime.fs import atomic_file

__all__ = ["PlottingUnavailable", "plot_attention", "require_matplotlib"]

_INCH_PER_PIECE = 0.35
_MAX_INCHES = 30.0


class PlottingUnavailable(ImportError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Fail early (before a long translation) when plots were asked for but cannot be drawn.

    Raises:
        PlottingUnavailable: with the install command.
    """
    _import_matplotlib()


def _import_matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlottingUnavailable(
            "attention plots need matplotlib: pip install seq2seq[plot]"
        ) from e
    return Figure, FigureCanvasAgg


def plot_attention(
    src_pieces: Sequence[str],
    tgt_pieces: Sequence[str],
    weights: torch.Tensor | Sequence[Sequence[float]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Save a heatmap of attention weights as an image (format from the suffix, e.g. PNG).

    Args:
        src_pieces: S source pieces, the columns.
        tgt_pieces: T target pieces (EOS included), the rows.
        weights: (T, S) attention weights, each row a distribution over the source.
        path: output file; parent directories are created.
        title: optional figure title (e.g. the source sentence).

    Returns:
        ``path`` as a `Path`.

    Raises:
        ValueError: the weights' shape does not match the pieces.
        PlottingUnavailable: matplotlib is not installed.
    """
    matrix = torch.as_tensor(weights, dtype=torch.float32).cpu()
    expected = (len(tgt_pieces), len(src_pieces))
    if tuple(matrix.shape) != expected:
        raise ValueError(
            f"attention weights have shape {tuple(matrix.shape)}, expected "
            f"(target pieces, source pieces) = {expected}"
        )
    figure_cls, canvas_cls = _import_matplotlib()
    width = min(_MAX_INCHES, 2.0 + _INCH_PER_PIECE * len(src_pieces))
    height = min(_MAX_INCHES, 1.5 + _INCH_PER_PIECE * len(tgt_pieces))
    fig = figure_cls(figsize=(max(width, 3.0), max(height, 2.5)))
    canvas_cls(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(src_pieces)), list(src_pieces), rotation=90, fontsize=8)
    ax.set_yticks(range(len(tgt_pieces)), list(tgt_pieces), fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    out = Path(path)
    with atomic_file(out) as tmp:  # the format comes from the name, not the temporary's
        fig.savefig(tmp, dpi=100, format=out.suffix[1:] or None)
    return out
