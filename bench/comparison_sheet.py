"""A labelled PNG sheet of same-place crops: LR (bicubic) | ours | others | HR, one row an image.

Numbers hide what a generative upscaler does to texture; a glance at crops shows it. Each crop is
taken where the HR image is textured all over (foliage, fabric, pebbles), since flat sky looks the
same for every method and a single strong edge shows only ringing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_FONT_SIZE = 14
_PAD = 6


@dataclass(frozen=True)
class SheetRow:
    title: str
    crops: list[Image.Image]  # one per column, all the same size
    captions: list[str]  # one per column, may be empty or hold several lines


def gradient_magnitude(gray: np.ndarray) -> np.ndarray:
    """Per-pixel |forward difference| in x plus in y, 0 on the last row/column's missing side."""
    magnitude = np.zeros_like(gray)
    magnitude[:, :-1] += np.abs(np.diff(gray, axis=1))
    magnitude[:-1, :] += np.abs(np.diff(gray, axis=0))
    return magnitude


def texture_score(window: np.ndarray) -> tuple[float, float]:
    """(median, mean) gradient of a box: the median needs detail over half the box, so one edge
    across flat sky scores 0; the mean only breaks ties, e.g. between boxes of a flat image."""
    return float(np.median(window)), float(window.mean())


def detail_box(hr: Image.Image, size: int) -> tuple[int, int, int, int]:
    """The ``size``-pixel square (clipped to the image) that is most textured all over.

    Boxes are tried on a grid of a quarter side and compared by ``texture_score``; the first (top
    to bottom, left to right) of equal ones wins, so the pick is reproducible.
    """
    gray = np.asarray(hr.convert("L"), dtype=np.float64)
    height, width = gray.shape
    side = min(size, height, width)
    magnitude = gradient_magnitude(gray)
    stride = max(1, side // 4)
    best, best_score = (0, 0), (-1.0, -1.0)
    for top in range(0, height - side + 1, stride):
        for left in range(0, width - side + 1, stride):
            score = texture_score(magnitude[top : top + side, left : left + side])
            if score > best_score:
                best, best_score = (left, top), score
    left, top = best
    return left, top, left + side, top + side


def render_sheet(columns: list[str], rows: list[SheetRow], zoom: int = 2) -> Image.Image:
    """Grid of crops enlarged ``zoom`` times (nearest neighbour, so pixels and grids stay visible)."""
    if not rows:
        raise ValueError("a comparison sheet needs at least one row")
    for row in rows:
        if len(row.crops) != len(columns) or len(row.captions) != len(columns):
            raise ValueError(f"row {row.title!r} has {len(row.crops)} crops for {len(columns)} columns")
    font = ImageFont.load_default(size=_FONT_SIZE)
    line = _FONT_SIZE + 4
    cell_w = max(crop.width for row in rows for crop in row.crops) * zoom
    cell_h = max(crop.height for row in rows for crop in row.crops) * zoom
    caption_lines = max(caption.count("\n") + 1 for row in rows for caption in row.captions)
    row_h = line + cell_h + caption_lines * line + _PAD  # title, crops, captions
    sheet = Image.new(
        "RGB",
        (_PAD + len(columns) * (cell_w + _PAD), line + _PAD + len(rows) * row_h),
        _BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    for i, label in enumerate(columns):
        draw.text((_PAD + i * (cell_w + _PAD), _PAD // 2), label, fill=_TEXT, font=font)
    for r, row in enumerate(rows):
        top = line + _PAD + r * row_h
        draw.text((_PAD, top), row.title, fill=_TEXT, font=font)
        for i, (crop, caption) in enumerate(zip(row.crops, row.captions, strict=True)):
            left = _PAD + i * (cell_w + _PAD)
            enlarged = crop.resize((crop.width * zoom, crop.height * zoom), Image.Resampling.NEAREST)
            sheet.paste(enlarged, (left, top + line))
            draw.multiline_text((left, top + line + cell_h + 2), caption, fill=_TEXT, font=font, spacing=4)
    return sheet
