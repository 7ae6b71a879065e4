"""Figures of the web app, drawn on the server as PNG bytes.

The Agg canvas directly, never pyplot: no global backend and no shared state
between the threads that serve requests.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from chexmask.quality import GOOD_DICE


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained", dpi=100)
    axes = figure.subplots(rows, cols, squeeze=rows * cols == 1)
    return figure, axes


def figure_png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def dice_histograms(values: Mapping[str, np.ndarray], label: str = "Dice RCA (Mean)") -> bytes:
    """One Dice RCA histogram per named series (overall, then each organ), side by side."""
    names = list(values) or ["(no data)"]
    figure, axes = new_figure(3.2 * len(names), 2.8, 1, len(names))
    axes = np.atleast_1d(axes).ravel()
    bins = np.linspace(0, 1, 41)
    for ax, name in zip(axes, names, strict=True):
        series = values.get(name, np.empty(0))
        series = series[~np.isnan(series)]
        ax.hist(series, bins=bins, color="#1f5fa8")
        ax.axvline(GOOD_DICE, color="#b22222", linestyle="--", linewidth=1)
        good = f", {np.mean(series >= GOOD_DICE):.0%} ≥ {GOOD_DICE}" if series.size else ""
        ax.set_title(f"{name} (n={series.size}{good})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel(label, fontsize=8)
    axes[0].set_ylabel("masks")
    return figure_png(figure)


def throughput(buckets: Sequence[tuple[datetime, int]], unit: str) -> bytes:
    """Segmentations made per time bucket."""
    figure, ax = new_figure(7, 2.6)
    if buckets:
        times, counts = zip(*buckets, strict=True)
        ax.bar(times, counts, width=_bar_width(unit), color="#1f5fa8", align="edge")
    ax.set_ylabel(f"masks per {unit}")
    ax.set_title("throughput", fontsize=9)
    figure.autofmt_xdate()
    return figure_png(figure)


def _bar_width(unit: str) -> float:
    return {"minute": 1 / 1440, "hour": 1 / 24, "day": 1.0}[unit] * 0.9
