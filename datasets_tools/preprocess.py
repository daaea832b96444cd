"""Preprocessing policies: decoded image → the tensor the encoder sees, plus a record of what was done.

Resizing is antialiased bilinear on float [0,1] tensors
(``torchvision.transforms.v2.functional.resize(..., antialias=True)``), as in the
official Stable Cascade training pipeline; crops are centred (deterministic).

Policies (``size`` defaults to 768 → 24×24 latents):

- ``center``: short side → ``size``, centre crop ``size``×``size``.
- ``buckets``: the official multi-aspect bucket list at ``size``² pixels, factor 32
  (:func:`bucket_sizes`); the bucket with the nearest aspect ratio is chosen, the image
  is resized to cover it and centre-cropped.
- ``keep-aspect``: short side → ``size``, then each side centre-cropped down to a
  multiple of 32.

The geometry (resized size, crop, crop box, bucket) depends only on ``(h, w, policy, size)``:
:func:`geometry` computes it without pixels and :func:`apply_geometry` applies it to float pixels on
any device (the dataset encoder resizes on the GPU this way); :func:`preprocess` is the two together.

Every policy returns a :class:`Preprocessed`: the ``(3,H,W)`` tensor and ``orig_size``
(h, w), ``crop_box`` (left, top, right, bottom) in original pixel coordinates (rounded)
and ``bucket`` (H, W) in pixels. The latent is ``16 × H/32 × W/32``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torchvision.transforms.v2 import functional as TF

from codec.errors import UsageError

POLICIES = ("center", "buckets", "keep-aspect")
FACTOR = 32
RESIZE = "bilinear-antialias"
# Official bucket aspect ratios (width/height of the portrait bucket); reciprocals give the landscape ones.
OFFICIAL_RATIOS = ("1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16")


@dataclass(frozen=True)
class Preprocessed:
    """The encoder input and how it was obtained."""

    pixels: torch.Tensor          # (3, H, W) float in [0, 1]
    orig_size: tuple[int, int]    # (h, w) of the decoded, upright image
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in original pixels
    bucket: tuple[int, int]       # (H, W) of ``pixels``


def bucket_sizes(size: int = 768, factor: int = FACTOR) -> list[tuple[int, int]]:
    """The official multi-aspect buckets ``(H, W)`` at ``size``² density, in list order, portrait then landscape.

    For a ratio r = w/h (≤ 1): ``H = floor(sqrt(size²/r)/factor)·factor``,
    ``W = floor(sqrt(size²·r)/factor)·factor`` (the rule of the official Bucketeer),
    computed exactly with integers. Duplicates (4/5 and 5/6 both give 832×672 at 768²)
    and empty buckets (tiny sizes) are dropped; landscape buckets are the transposes.
    """
    density = size * size
    out: list[tuple[int, int]] = []
    for text in OFFICIAL_RATIOS:
        r = Fraction(text)
        # floor(sqrt(x)) == isqrt(floor(x)) for x >= 0, so this is exact.
        h = math.isqrt(math.floor(density / r)) // factor * factor
        w = math.isqrt(math.floor(density * r)) // factor * factor
        if h and w and (h, w) not in out:  # 4/5 and 5/6 give the same bucket at 768²
            out.append((h, w))
    out += [(w, h) for h, w in out if h != w]
    return out


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest in log space to ``height``×``width`` (first one on ties)."""
    a = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - a))


@dataclass(frozen=True)
class Geometry:
    """What a policy does to an ``h``×``w`` image, computed without its pixels (:func:`geometry`): resize to
    ``resized`` (H, W), then crop ``bucket`` (H, W) at ``(top, left)`` of the resized image; ``crop_box`` is that crop
    in original pixels (left, top, right, bottom), rounded."""

    orig_size: tuple[int, int]
    resized: tuple[int, int]
    bucket: tuple[int, int]
    top: int
    left: int
    crop_box: tuple[int, int, int, int]


def _short_side(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision's rule for resize(x, size): the long side is int(size * long / short).
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _centre_crop(h: int, w: int, resized: tuple[int, int], crop: tuple[int, int]) -> Geometry:
    """Resize ``h``×``w`` to ``resized`` then centre-crop to ``crop``; the crop is also recorded in original pixels."""
    rh, rw = resized
    ch, cw = crop
    top = int(round((rh - ch) / 2.0))
    left = int(round((rw - cw) / 2.0))
    sy, sx = h / rh, w / rw
    box = (round(left * sx), round(top * sy), round((left + cw) * sx), round((top + ch) * sy))
    return Geometry((h, w), (rh, rw), (ch, cw), top, left, box)


def geometry(h: int, w: int, policy: str = "center", size: int = 768) -> Geometry:
    """What ``policy`` at ``size`` does to an ``h``×``w`` image (no pixels needed; :func:`apply_geometry` does it)."""
    if policy not in POLICIES:
        raise UsageError(f"unknown preprocessing policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if size < FACTOR or size % FACTOR:
        raise UsageError(f"size must be a positive multiple of {FACTOR}, got {size}")
    h, w = int(h), int(w)
    if policy == "center":
        return _centre_crop(h, w, _short_side(h, w, size), (size, size))
    if policy == "keep-aspect":
        rh, rw = _short_side(h, w, size)
        return _centre_crop(h, w, (rh, rw), (rh // FACTOR * FACTOR, rw // FACTOR * FACTOR))
    bh, bw = nearest_bucket(h, w, bucket_sizes(size))
    scale = max(bh / h, bw / w)
    resized = (max(bh, math.ceil(h * scale - 1e-9)), max(bw, math.ceil(w * scale - 1e-9)))
    return _centre_crop(h, w, resized, (bh, bw))


def apply_geometry(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Resize float pixels ``(..., 3, h, w)`` in [0,1] (any device) as ``g`` says (antialiased bilinear, clamped to
    [0,1]) and crop; returns a contiguous ``(..., 3, H, W)`` tensor on the same device."""
    if tuple(x.shape[-2:]) != g.orig_size:
        raise ValueError(f"geometry is for a {g.orig_size} image, got pixels of shape {list(x.shape)}")
    if g.resized != g.orig_size:
        x = TF.resize(x, list(g.resized), interpolation=TF.InterpolationMode.BILINEAR, antialias=True).clamp_(0, 1)
    (ch, cw), top, left = g.bucket, g.top, g.left
    return x[..., top:top + ch, left:left + cw].contiguous()


def preprocess(x: torch.Tensor, policy: str = "center", size: int = 768) -> Preprocessed:
    """Apply ``policy`` to an RGB float image ``(3,h,w)`` in [0,1]: :func:`geometry` then :func:`apply_geometry`."""
    h, w = x.shape[-2:]
    g = geometry(h, w, policy, size)
    return Preprocessed(apply_geometry(x, g), g.orig_size, g.crop_box, g.bucket)


def known_buckets(policy: str, size: int) -> list[tuple[int, int]]:
    """Buckets a policy can produce when they are known in advance (empty for ``keep-aspect``)."""
    if policy == "center":
        return [(size, size)]
    if policy == "buckets":
        return bucket_sizes(size)
    return []
