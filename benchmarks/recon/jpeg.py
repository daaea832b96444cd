"""JPEG through Pillow (libjpeg): fixed quality and fractional quality (the byte-budget search is in :mod:`.formats`).

Pillow's ``quality=q`` scales libjpeg's standard quantisation tables by the IJG rule
(``s = ⌊5000/q⌋`` below 50, ``200 − 2q`` above; entry = ``⌊(base·s + 50)/100⌋`` clamped to
1…255). The same rule with a *fractional* q gives tables between two integer qualities,
so a byte budget can be met much more closely than integer qualities allow. The base
tables are read from Pillow itself (quality 50 leaves them unscaled), not copied here.
Files are baseline JPEG with optimised Huffman tables and 4:2:0 chroma subsampling.
"""

from __future__ import annotations

import io
from functools import lru_cache

from PIL import Image

SUBSAMPLING = 2  # Pillow: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0


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
