"""Small image corpora for the dataset tests (made on the fly; nothing is downloaded)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A reproducible noisy RGB gradient (compressible but not flat)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(1, w - 1), y * 255 / max(1, h - 1), (x + y) * 127 / max(1, h + w - 2)], -1)
    arr = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img if mode == "RGB" else img.convert(mode)


def image_bytes(h: int, w: int, seed: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    noise_image(h, w, seed).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path, n: int, start: int = 0, sizes=((64, 96), (96, 64), (80, 80))) -> list[str]:
    """``n`` images ``img_{i:03d}.png`` (varied sizes) with a .txt caption each; returns the ids."""
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(start, start + n):
        h, w = sizes[i % len(sizes)]
        noise_image(h, w, i).save(root / f"img_{i:03d}.png")
        (root / f"img_{i:03d}.txt").write_text(f"caption {i}", encoding="utf-8")
        ids.append(f"img_{i:03d}")
    return ids


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares ``width``×``height`` pixels (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    """Write a tar file with the given member names and contents (in the given order)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()


def test_helpers_make_what_they_claim(tmp_path):
    """The corpus makers must produce what the other tests rely on (a bomb header, a valid tar)."""
    from PIL import Image as PILImage

    guard = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = None  # peek at the declared size without the guard
    try:
        with PILImage.open(io.BytesIO(bomb_png())) as im:
            assert im.size == (100_000, 100_000)
    finally:
        PILImage.MAX_IMAGE_PIXELS = guard
    tar = make_tar(tmp_path / "t.tar", {"a.txt": b"x"})
    with tarfile.open(tar) as tf:
        assert tf.extractfile("a.txt").read() == b"x"
