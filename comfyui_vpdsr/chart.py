"""The inspector's bar chart: the top tags of the input and the output side by side.

Drawn with matplotlib's object API on an Agg canvas (never pyplot), because ComfyUI runs nodes
in a worker thread and pyplot's global figure state is not thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LR_COLOR = "#4C72B0"
SR_COLOR = "#DD8452"
WIDTH_PX = 768
DPI = 100


@dataclass(frozen=True)
class TagBar:
    """One row of the chart; ``lr`` is None when there is no reference image."""

    tag: str
    lr: float | None
    sr: float
    mark: str = ""  # "+" new in the output (possible hallucination), "-" lost from the input


def chart_height_px(rows: int) -> int:
    return int(DPI * (1.3 + 0.32 * max(rows, 1)))


def tag_chart(bars: Sequence[TagBar], title: str, rows: int | None = None) -> np.ndarray:
    """An (H, W, 3) float32 image in [0, 1]; ``rows`` fixes the height so a batch can be stacked."""
    rows = max(rows or len(bars), len(bars), 1)
    # matplotlib loads with the first chart, not with the pack: ComfyUI imports the pack at its start-up
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_PX / DPI, chart_height_px(rows) / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    has_lr = any(b.lr is not None for b in bars)
    y = np.arange(len(bars))
    height = 0.4 if has_lr else 0.7
    labels = [f"{b.tag} ({b.mark})" if b.mark else b.tag for b in bars]
    if has_lr:
        ax.barh(y - height / 2, [b.lr or 0.0 for b in bars], height, color=LR_COLOR, label="input (LR)")
        ax.barh(y + height / 2, [b.sr for b in bars], height, color=SR_COLOR, label="output (SR)")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.barh(y, [b.sr for b in bars], height, color=SR_COLOR)
    ax.set_yticks(y, labels, fontsize=9)
    ax.set_ylim(rows - 0.5, -0.5)  # most likely tag on top; empty rows keep batch charts one size
    ax.set_xlim(0, max([b.sr for b in bars] + [b.lr or 0.0 for b in bars] + [1e-3]) * 1.15)
    marks = " · (+) new in the output, possible hallucination · (-) lost" if any(b.mark for b in bars) else ""
    ax.set_xlabel("zero-shot CLIP probability" + marks, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].astype(np.float32) / 255.0
