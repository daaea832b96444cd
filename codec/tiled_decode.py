"""Stage A decoding in overlapping tiles, so that a huge output needs only one tile's activations at a time.

Stage A's decoder is convolutional and normalises each pixel on its own (LayerNorm over channels, no GroupNorm),
so an output pixel depends only on the latent pixels within a fixed radius of it: its receptive field
(:func:`receptive_radius`). Each tile is decoded from its core plus a halo of at least that radius and only the
core's pixels are kept, so the result equals the decode in one piece up to floating-point summation order (the
halo's pixels, which see the tile's edge instead of their real neighbours, are the ones dropped). The output is
written tile by tile into one tensor in host memory, so the device holds one tile's activations at a time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import check_finite
from .progress import progress_bar
from .stage_a import StageA

__all__ = ["MIN_TILE", "decode_tiled", "receptive_radius", "stage_a_halo", "tile_side"]

MIN_TILE = 8  # smallest tile core (latent pixels) worth decoding: below it the halo dwarfs the work


def receptive_radius(*parts: nn.Module) -> int:
    """How many input pixels on each side an output pixel of a decoder depends on, rounded up: ``parts`` are the
    decoder's modules in the order they run.

    Walks their layers in order: a convolution of kernel k (dilation d) reaches ``d·(k-1)/2`` pixels at the
    resolution it runs at, a transposed convolution of kernel k and stride s ``ceil(k/s)`` of its input pixels (a
    bound, one more than the exact reach for Stage A's k=4, s=2), and a pixel shuffle changes the resolution for the
    layers after it. Per-pixel layers (LayerNorm, Linear, 1×1 convolutions) add nothing. For the
    released Stage A (12 bottleneck blocks) this gives 15 latent pixels; measured with gradients, 13
    (``tests/test_tiled_decode.py``)."""
    reach, scale = 0.0, 1.0  # reach in input pixels; output pixels per input pixel at the current layer
    for m in (layer for part in parts for layer in part.modules()):
        if isinstance(m, nn.ConvTranspose2d):
            reach += max(math.ceil(k / s) for k, s in zip(m.kernel_size, m.stride)) / scale
            scale *= max(m.stride)
        elif isinstance(m, nn.Conv2d):
            reach += max(d * (k - 1) / 2 for k, d in zip(m.kernel_size, m.dilation)) / scale
            scale /= max(m.stride)
        elif isinstance(m, nn.PixelShuffle):
            scale *= m.upscale_factor
    return math.ceil(reach)


def stage_a_halo(stage_a: StageA) -> int:
    """Latent pixels of context a Stage A tile needs on each side: the receptive radius of its decoder."""
    return receptive_radius(stage_a.up_blocks, stage_a.out_block)


def tile_side(bytes_per_pixel: float, budget: float, halo: int) -> int | None:
    """Largest tile core side (latent pixels) whose window, core plus ``halo`` on each side, needs at most
    ``budget`` bytes at ``bytes_per_pixel`` (per latent pixel, the whole batch), or ``None`` when not even a
    :data:`MIN_TILE` core fits."""
    window = math.isqrt(max(0, int(budget // max(bytes_per_pixel, 1e-9))))
    core = window - 2 * halo
    return core if core >= MIN_TILE else None


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    """``[start, end)`` of equal-sized cores (at most ``tile``) covering ``range(length)``."""
    n = math.ceil(length / tile)
    step = math.ceil(length / n)
    return [(s, min(length, s + step)) for s in range(0, length, step)]


@torch.no_grad()
def decode_tiled(stage_a: StageA, z: torch.Tensor, tile: int, halo: int | None = None,
                 crop: tuple[int, int] | None = None, progress: bool | None = None) -> torch.Tensor:
    """Stage A decode of ``z`` ``(B,C,h,w)`` in tiles whose cores are at most ``tile`` latent pixels a side.

    ``halo`` (default: :func:`stage_a_halo`) is how many latent pixels of context each tile gets on each side.
    ``crop=(height, width)`` keeps only the top-left ``height``×``width`` pixels (tiles wholly outside are skipped).
    Returns fp32 in host memory, not clamped; ``progress`` shows a bar over tiles (``None``: on a terminal; see
    :func:`codec.progress.progress_bar`).
    """
    if halo is None:
        halo = stage_a_halo(stage_a)
    if tile < 1:
        raise ValueError(f"tile must be at least 1 latent pixel, got {tile}")
    b, _, h, w = z.shape
    f = 4  # Stage A's stride
    out_h, out_w = crop if crop is not None else (f * h, f * w)
    out_h, out_w = min(out_h, f * h), min(out_w, f * w)
    rows = [r for r in _spans(h, tile) if f * r[0] < out_h]
    cols = [c for c in _spans(w, tile) if f * c[0] < out_w]
    out = torch.empty(b, 3, out_h, out_w, dtype=torch.float32)
    bar = progress_bar(len(rows) * len(cols), "Stage A tiles", unit="tile", enabled=progress)
    try:
        for y0, y1 in rows:
            for x0, x1 in cols:
                wy0, wx0 = max(0, y0 - halo), max(0, x0 - halo)
                window = z[..., wy0:min(h, y1 + halo), wx0:min(w, x1 + halo)]
                img = stage_a.decode(window).float()
                oy0, oy1, ox0, ox1 = f * y0, min(out_h, f * y1), f * x0, min(out_w, f * x1)
                core = img[..., oy0 - f * wy0:oy1 - f * wy0, ox0 - f * wx0:ox1 - f * wx0]
                out[..., oy0:oy1, ox0:ox1] = check_finite(core, "Stage A").cpu()
                bar.update(1)
    finally:
        bar.close()
    return out
