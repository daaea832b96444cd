"""Conversion of user images (paths, PIL, numpy, uint8/float tensors) to RGB float tensors in [0,1] and back.

This is the only place pixels change representation; inside the models everything is
RGB float in [0,1], ``(B,3,H,W)``.

Policy for unusual files: EXIF orientation is applied; grayscale, palette, CMYK, LA,
16-bit and 32-bit integer/float images are converted to 8-bit-equivalent RGB; images with
transparency are composited onto white (transparent pixels often hold arbitrary colours).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CascadeError, UsageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

# Decompression-bomb guard: refuse absurd sizes instead of swapping the machine to death.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class ImageReadError(CascadeError):
    """An input cannot be read as an image. ``reason`` says why (``"what: details"``); the message
    also names the file."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            peak = 1.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: str | os.PathLike | bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """Open an image (a path, its bytes or a binary file object) as an upright 8-bit RGB PIL image.

    Raises :class:`ImageReadError` naming the file (``name``, else the path) with one of the
    reasons ``no such file``, ``empty file``, ``not an image``, ``too large
    (decompression-bomb guard)`` or ``unreadable image`` (truncated or corrupt).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        if not len(source):
            raise ImageReadError(name, "empty file: 0 bytes")
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        path = Path(source)
        if not path.is_file():
            raise ImageReadError(name, "no such file")
        if path.stat().st_size == 0:
            raise ImageReadError(name, "empty file: 0 bytes")
    else:
        name = name or getattr(source, "name", "<file>")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as img:
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageReadError(name, f"too large (decompression-bomb guard): {e}") from None
        except UnidentifiedImageError:
            raise ImageReadError(name, "not an image: no image format recognised") from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
            raise ImageReadError(name, f"unreadable image: {type(e).__name__}: {e}") from None


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image → ``(3,H,W)`` uint8 with the same pixel values (converted to RGB first, by the policy above)."""
    arr = np.asarray(_to_rgb(img) if img.mode != "RGB" else img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) → float in [0,1] (``x / 255``); :func:`to_uint8` maps them back exactly."""
    if images.dtype != torch.uint8:
        raise ValueError(f"from_uint8 takes uint8 pixels, got {images.dtype}")
    return images.float() / 255


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image → ``(3,H,W)`` float in [0,1] (converted to RGB first)."""
    return from_uint8(pil_to_uint8(img))


def _array_to_tensor(x: torch.Tensor) -> torch.Tensor:
    """Numeric array in HWC/CHW/BCHW/BHWC, uint8 or float → ``(B,3,H,W)`` float in [0,1]."""
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.is_floating_point():
        x = x.float()
    else:
        raise UsageError(f"image tensors must be uint8 or float, got {x.dtype}")
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise UsageError(f"image tensors must have 2 to 4 dimensions, got shape {list(x.shape)}")
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3] * x[:, 3:] + (1 - x[:, 3:])
    elif x.shape[1] != 3:
        raise UsageError(f"image tensors need 1, 3 or 4 channels, got shape {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise UsageError("image tensor contains NaN or inf")
    return x.clamp(0, 1)


def to_tensor_list(images: ImageLike | Sequence[ImageLike]) -> list[torch.Tensor]:
    """Any supported image input (one or many) → list of ``(3,H,W)`` float tensors in [0,1]."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    elif isinstance(images, (np.ndarray, torch.Tensor)):
        t = _array_to_tensor(torch.as_tensor(images))
        return list(t.unbind(0))
    out: list[torch.Tensor] = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            out.append(pil_to_tensor(load_image(item)))
        elif isinstance(item, Image.Image):
            out.append(pil_to_tensor(ImageOps.exif_transpose(item)))
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            out.extend(_array_to_tensor(torch.as_tensor(item)).unbind(0))
        else:
            raise TypeError(f"cannot use {type(item).__name__} as an image; give a path, PIL image, numpy array "
                            "or tensor")
    return out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0,1] (any shape) → uint8, clamped and rounded to nearest: the one quantisation used for
    saved images and for every reconstruction metric. Holds one float copy at a time (a 20000² image is 4.8 GB)."""
    return images.detach().float().clamp(0, 1).mul_(255).round_().to(torch.uint8)


def uint8_to_pil(image: torch.Tensor) -> Image.Image:
    """``(3,H,W)`` uint8 → RGB PIL image with the same pixel values."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"uint8_to_pil takes one (3,H,W) uint8 image, got {image.dtype} {list(image.shape)}")
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B,3,H,W)`` or ``(3,H,W)`` float in [0,1] → PIL images (rounded to uint8)."""
    if images.ndim == 3:
        images = images[None]
    return [uint8_to_pil(x) for x in to_uint8(images)]


def save_images(images: Sequence[Image.Image], out: str | os.PathLike,
                texts: dict[str, str] | None = None) -> list[Path]:
    """Write ``images`` to ``out`` (several: ``OUT_000.png``, ``OUT_001.png``, …), each atomically; ``texts`` go
    into PNG text chunks (prompt, settings). The format follows the suffix; returns the paths written."""
    from .files import atomic_write

    out = Path(out)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i:03d}{out.suffix}")
                                            for i in range(len(images))]
    for img, p in zip(images, paths):
        extra = {}
        if texts and p.suffix.lower() == ".png":
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            for key, value in texts.items():
                info.add_itxt(key, value)
            extra["pnginfo"] = info
        with atomic_write(p) as tmp:
            img.save(tmp, format=Image.registered_extensions().get(p.suffix.lower()), **extra)
    return paths


def check_image_path(path: str | os.PathLike) -> Path:
    """``path`` if its suffix names an image format PIL writes, else a :class:`UsageError` (checked before any
    work is done)."""
    p = Path(path)
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if p.suffix.lower() not in writable:
        common = ", ".join(e for e in (".png", ".jpg", ".webp", ".tif", ".bmp") if e in writable)
        raise UsageError(f"{p}: {'no file extension' if not p.suffix else repr(p.suffix) + ' is not an image format'};"
                         f" end the output name in one of {common}")
    return p
