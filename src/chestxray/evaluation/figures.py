"""The panel grid shared by the ROC, precision-recall and reliability figures."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def panel_figure(n: int) -> tuple[Any, np.ndarray]:
    """A Figure of `n` panels, up to 5 a row (3 x 5 for NIH's 14), as wide as the panels it
    holds, and its axes (spare ones are switched off by the caller)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(1, min(5, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(max(3.2 * cols, 5.0), 3 * rows + 0.4), dpi=80)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False).ravel()


def finish_panels(fig: Any, axes: np.ndarray, n: int, title: str) -> None:
    """Each panel on the unit square, spare panels off, the title, a tight layout."""
    for ax in axes[:n]:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
