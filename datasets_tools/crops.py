"""Crops of photographs, for benchmark corpora and small training sets.

Two ways to cut them, one function each: :func:`grid_tiles`, a centred grid of non-overlapping
tiles at 1:1 scale (no resampling: what a codec benchmark wants), and
:func:`random_crop_boxes` with :func:`cut`, seeded random crops resized to an output size (many
distinct images from a few photos). Boxes are ``(left, top, right, bottom)`` in source pixels, as
PIL's ``Image.crop`` takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]


class Tile(NamedTuple):
    """A tile of :func:`grid_tiles`: its row, column and box edges."""

    row: int
    col: int
    left: int
    top: int
    right: int
    bottom: int

    @property
    def box(self) -> Box:
        """``(left, top, right, bottom)``."""
        return self.left, self.top, self.right, self.bottom


def grid_tiles(width: int, height: int, side: int) -> list[Tile]:
    """The centred grid of non-overlapping ``side``² tiles of a ``width``×``height`` image, row by row.

    ``nx = width // side`` by ``ny = height // side`` tiles; the margins ``(width − nx·side) // 2`` and
    ``(height − ny·side) // 2`` centre the grid. Empty when a side of the image is shorter than ``side``.
    """
    nx, ny = width // side, height // side
    left0, top0 = (width - nx * side) // 2, (height - ny * side) // 2
    return [Tile(r, c, left0 + c * side, top0 + r * side, left0 + (c + 1) * side, top0 + (r + 1) * side)
            for r in range(ny) for c in range(nx)]


@dataclass(frozen=True)
class RandomCrop:
    """A crop of :func:`random_crop_boxes`: the index of its ``source``, its ``box`` there and the ``size``
    ``(width, height)`` it is resized to."""

    source: int
    box: Box
    size: tuple[int, int]


def random_crop_boxes(sizes: Sequence[tuple[int, int]], n: int, seed: int, side: int | tuple[int, int],
                      scale: tuple[float, float], upscale: bool = True) -> list[RandomCrop]:
    """``n`` seeded random crops of sources of the given ``(width, height)`` sizes.

    Crop ``k`` comes from source ``k`` while ``k < len(sizes)``, then from a source drawn with
    probability proportional to its area (a large photo has room for more distinct crops). Its
    output size is ``side``² for an int ``side``; for a ``(low, high)`` pair, width and height
    are drawn independently from ``low…high``. Its box has the output's aspect ratio and is
    ``u`` times the largest such box that fits in the source, ``u`` uniform in ``scale``, at a
    uniform random position. ``upscale=False`` never makes a crop larger than its box: the
    output size is clipped to the source, and the box is at least the output size.

    Crop ``k`` depends only on ``seed``, the sizes and ``k``: a longer list starts with a
    shorter one.
    """
    rng = np.random.default_rng(seed)
    areas = np.array([w * h for w, h in sizes], dtype=np.float64)
    crops = []
    for k in range(n):
        i = k if k < len(sizes) else (int(rng.choice(len(sizes), p=areas / areas.sum())) if len(sizes) > 1 else 0)
        width, height = sizes[i]
        if isinstance(side, int):
            out_w = out_h = side
        else:
            out_w, out_h = int(rng.integers(side[0], side[1] + 1)), int(rng.integers(side[0], side[1] + 1))
        if not upscale:
            out_w, out_h = min(out_w, width), min(out_h, height)
        fit_w, fit_h = min(width, height * out_w / out_h), min(height, width * out_h / out_w)
        low, high = scale
        if not upscale:
            low = min(high, max(low, out_w / fit_w, out_h / fit_h))
        u = rng.uniform(low, high)
        crop_w, crop_h = max(1, int(fit_w * u)), max(1, int(fit_h * u))
        if not upscale:  # int() may round a box of exactly the output size one pixel below it
            crop_w, crop_h = max(crop_w, out_w), max(crop_h, out_h)
        left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        crops.append(RandomCrop(i, (left, top, left + crop_w, top + crop_h), (out_w, out_h)))
    return crops


def cut(image: Image.Image, crop: RandomCrop, resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """The ``crop`` of ``image`` (its source), resized to the crop's size with ``resample``."""
    return image.crop(crop.box).resize(crop.size, resample)


def random_crops(image: Image.Image, n: int, side: int | tuple[int, int], seed: int, scale: tuple[float, float],
                 resample: Image.Resampling = Image.Resampling.BICUBIC) -> list[Image.Image]:
    """``n`` seeded random crops of one image (:func:`random_crop_boxes` with its size), resized with
    ``resample``."""
    return [cut(image, c, resample) for c in random_crop_boxes([image.size], n, seed, side, scale)]
