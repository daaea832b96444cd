"""The image grid: per image a row with the original beside every codec's reconstruction, and under it the
same centre crop of each, enlarged (nearest neighbour) so that detail can be compared.

Layout (all in pixels): title lines on top (``LINE`` each), a header of column titles
(``HEADER``), then per image: the images scaled to ``cell`` wide (height by the aspect ratio),
a caption line (``LINE``), the zoomed crops (``cell``×``cell``) and a gap. Columns are
``cell`` wide with ``GAP`` between them and around them; see :func:`grid_size`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from codec.images import uint8_to_pil

CELL, GAP, LINE, HEADER = 256, 6, 16, 46
ZOOM_FRACTION = 8  # the crop is 1/8 of the short side, at the centre


@dataclass
class GridRow:
    """One image: the original and, per column after it, the reconstruction and its caption."""

    image_id: str
    original: torch.Tensor
    recons: list[tuple[torch.Tensor | None, str]]


def zoom_box(height: int, width: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the centre crop that is shown enlarged."""
    side = max(8, min(height, width) // ZOOM_FRACTION)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _thumb_height(image: torch.Tensor, cell: int) -> int:
    h, w = image.shape[-2:]
    return max(1, round(cell * h / w))


def grid_size(rows: list[GridRow], n_columns: int, n_title_lines: int, cell: int = CELL) -> tuple[int, int]:
    """``(width, height)`` of the grid."""
    width = GAP + n_columns * (cell + GAP)
    height = n_title_lines * LINE + HEADER
    for r in rows:
        height += _thumb_height(r.original, cell) + LINE + cell + 2 * GAP
    return width, height


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _ascii(text: str) -> str:
    """Pillow's default font lacks some symbols."""
    return text.replace("×", "x").replace("→", "->").replace("²", "^2").replace("σ", "sigma")


def make_grid(rows: list[GridRow], column_titles: list[str], title_lines: list[str], cell: int = CELL) -> Image.Image:
    """The grid image. ``column_titles`` names every column, the original's first."""
    n = len(column_titles)
    width, height = grid_size(rows, n, len(title_lines), cell)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    y = 0
    for line in title_lines:
        draw.text((GAP, y + 2), _ascii(line), fill=(160, 0, 0) if "TINY RANDOM" in line else "black", font=font)
        y += LINE
    chars = max(8, cell // 7)
    for j, t in enumerate(column_titles):
        for k, part in enumerate(textwrap.wrap(_ascii(t), chars)[:3]):
            draw.text((GAP + j * (cell + GAP), y + 2 + k * 14), part,
                      fill=(160, 0, 0) if "TINY RANDOM" in t else "black", font=font)
    y += HEADER
    for r in rows:
        th = _thumb_height(r.original, cell)
        box = zoom_box(*r.original.shape[-2:])
        h, w = r.original.shape[-2:]
        scale = cell / w
        images = [(r.original, f"{r.image_id} {w}×{h}")] + list(r.recons)
        for j, (img, caption) in enumerate(images):
            x = GAP + j * (cell + GAP)
            if img is None:
                draw.text((x, y + th // 2), "(missing)", fill="gray", font=font)
            else:
                pil = uint8_to_pil(img)
                canvas.paste(pil.resize((cell, th), Image.Resampling.LANCZOS), (x, y))
                draw.rectangle([x + box[0] * scale, y + box[1] * scale, x + box[2] * scale, y + box[3] * scale],
                               outline=(255, 0, 0), width=1)
                canvas.paste(pil.crop(box).resize((cell, cell), Image.Resampling.NEAREST), (x, y + th + LINE))
            draw.text((x, y + th + 1), _ascii(caption)[: cell // 6], fill="black", font=font)
        y += th + LINE + cell + 2 * GAP
    return canvas
