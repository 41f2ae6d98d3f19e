"""A labelled PNG sheet of same-place crops: LR (bicubic) | ours | others | HR, one row an image.

Numbers hide what a generative upscaler does to texture; a glance at crops shows it. Each crop is
taken where the HR image has the most edges, since flat sky looks the same for every method.
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
    captions: list[str]  # one per column, may be empty


def detail_box(hr: Image.Image, size: int) -> tuple[int, int, int, int]:
    """The ``size``-pixel square (clipped to the image) holding the most HR gradient energy."""
    gray = np.asarray(hr.convert("L"), dtype=np.float64)
    height, width = gray.shape
    side = min(size, height, width)
    energy = np.zeros_like(gray)
    energy[:, 1:] += np.abs(np.diff(gray, axis=1))
    energy[1:, :] += np.abs(np.diff(gray, axis=0))
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    stride = max(1, side // 4)
    tops = list(range(0, height - side + 1, stride))
    lefts = list(range(0, width - side + 1, stride))
    best, best_score = (0, 0), -1.0
    for top in tops:
        for left in lefts:
            score = (
                integral[top + side, left + side]
                - integral[top, left + side]
                - integral[top + side, left]
                + integral[top, left]
            )
            if score > best_score:
                best, best_score = (left, top), score
    left, top = best
    return left, top, left + side, top + side


def render_sheet(columns: list[str], rows: list[SheetRow], zoom: int = 2) -> Image.Image:
    """Grid of crops enlarged ``zoom`` times (nearest neighbour, so pixels stay visible)."""
    if not rows:
        raise ValueError("a comparison sheet needs at least one row")
    for row in rows:
        if len(row.crops) != len(columns) or len(row.captions) != len(columns):
            raise ValueError(f"row {row.title!r} has {len(row.crops)} crops for {len(columns)} columns")
    font = ImageFont.load_default(size=_FONT_SIZE)
    line = _FONT_SIZE + 4
    cell_w = max(crop.width for row in rows for crop in row.crops) * zoom
    cell_h = max(crop.height for row in rows for crop in row.crops) * zoom
    row_h = line + cell_h + line + _PAD  # title, crops, captions
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
            draw.text((left, top + line + cell_h + 2), caption, fill=_TEXT, font=font)
    return sheet
