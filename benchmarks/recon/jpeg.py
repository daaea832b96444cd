"""JPEG through Pillow (libjpeg): fixed quality, fractional quality, and the largest quality under a byte budget.

Pillow's ``quality=q`` scales libjpeg's standard quantisation tables by the IJG rule
(``s = ⌊5000/q⌋`` below 50, ``200 − 2q`` above; entry = ``⌊(base·s + 50)/100⌋`` clamped to
1…255). The same rule with a *fractional* q gives tables between two integer qualities,
so a byte budget can be met much more closely than integer qualities allow. The base
tables are read from Pillow itself (quality 50 leaves them unscaled), not copied here.
Files are baseline JPEG with optimised Huffman tables and 4:2:0 chroma subsampling.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

SUBSAMPLING = 2  # Pillow: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
SEARCH_STEPS = 24


@lru_cache(maxsize=1)
def base_tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """libjpeg's standard luminance and chrominance tables as Pillow writes them (quality 50 = unscaled)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG", quality=50, subsampling=SUBSAMPLING)
    tables = Image.open(io.BytesIO(buf.getvalue())).quantization
    return tuple(tables[0]), tuple(tables[1])


def quality_tables(quality: float) -> list[list[int]]:
    """Quantisation tables for a (possibly fractional) quality in [1, 100], by the IJG scaling rule."""
    q = min(100.0, max(1.0, float(quality)))
    scale = float(int(5000.0 / q)) if q < 50 else 200.0 - 2.0 * q  # libjpeg truncates 5000/q
    return [[min(255, max(1, int((b * scale + 50) // 100))) for b in table] for table in base_tables()]


def encode(img: Image.Image, quality: float) -> bytes:
    """JPEG bytes of ``img`` at ``quality``; an integer quality is Pillow's own ``quality=``."""
    buf = io.BytesIO()
    if float(quality).is_integer():
        img.save(buf, "JPEG", quality=int(quality), subsampling=SUBSAMPLING, optimize=True)
    else:
        img.save(buf, "JPEG", qtables=quality_tables(quality), subsampling=SUBSAMPLING, optimize=True)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    """RGB image from JPEG bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


@dataclass
class BudgetResult:
    """The JPEG found for a byte budget: its bytes, quality, and whether even quality 1 was over budget."""

    data: bytes
    quality: float
    over_budget: bool
    tries: int


def encode_under_budget(img: Image.Image, budget: int, steps: int = SEARCH_STEPS) -> BudgetResult:
    """The largest (fractional) quality whose file fits in ``budget`` bytes, by bisection on quality.

    File size grows with quality almost monotonically, so bisection over [1, 100] finds the
    largest fitting quality to within ``99/2**steps``. When even quality 1 does not fit, the
    quality-1 file is returned with ``over_budget=True`` (its true size is what gets reported).
    """
    best = encode(img, 1)
    if len(best) > budget:
        return BudgetResult(best, 1.0, True, 1)
    top = encode(img, 100)
    if len(top) <= budget:
        return BudgetResult(top, 100.0, False, 2)
    lo, hi, best_q, tries = 1.0, 100.0, 1.0, 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        data = encode(img, mid)
        tries += 1
        if len(data) <= budget:
            lo = mid
            if len(data) >= len(best):
                best, best_q = data, mid
        else:
            hi = mid
    return BudgetResult(best, best_q, False, tries)
