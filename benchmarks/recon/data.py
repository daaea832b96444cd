"""Benchmark inputs: the reference images (uint8, at the benchmark resolution) and, for latent stores, the latents.

Image sources (a folder, a CSV/JSONL manifest, webdataset ``.tar`` shards) are listed by
:func:`datasets_tools.sources.list_source` (deterministic order) and preprocessed with the
dataset tools' ``center`` policy: short side resized to ``size`` with antialiased bilinear
(torchvision), then the centre ``size``×``size`` square; an image already ``size``×``size``
is used as it is. The result is rounded to uint8: that is the reference every codec sees
and every metric compares against.

A latent store written by ``cascade encode-dataset`` gives decode-only mode: each stored
latent is decoded at the size it stands for (encoder input / 0.75, 768 → 1024), and the
reference is the original file cut to the recorded crop box and resized to that size with
the same kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from codec.codec import default_output_size
from codec.errors import UsageError
from codec.images import to_uint8
from datasets_tools.encode import SampleError, decode_image
from datasets_tools.preprocess import RESIZE, preprocess
from datasets_tools.sources import Sample, list_source

RESIZE_KERNEL = f"{RESIZE} (torchvision resize, antialias=True)"


@dataclass
class BenchItem:
    """One reference image (``(3,H,W)`` uint8) and, in decode-only mode, its stored latent ``(16,h,w)``."""

    index: int
    id: str
    source: str
    image: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    orig_size: tuple[int, int] = (0, 0)
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    error: str | None = None


@dataclass
class BenchDataset:
    """A listed benchmark dataset: ``kind`` is ``images`` or ``store``; items are read on demand, in order."""

    path: str
    kind: str
    size: int | None
    samples: list[Sample] = field(default_factory=list)
    store_dtype: str | None = None
    _latents: Any = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def latent_itemsize(self) -> int:
        """Bytes per stored latent value (2 for float16, 1 for int8): the rate the decode-only codec is charged."""
        return {"float32": 4, "int8": 1}.get(self.store_dtype or "float16", 2)

    def describe(self) -> dict[str, Any]:
        """What every report states about the data: path, kind, N, resolution, crop and resize kernel."""
        if self.kind == "store":
            crop = ("as recorded in the store (encode-dataset's crop box), then resized to the size each latent "
                    "stands for (encoder input / 0.75)")
            resolution = "encoder input / 0.75 per sample (768² → 1024²)"
        else:
            crop = f"short side → {self.size} px, then the centre {self.size}×{self.size} square"
            resolution = f"{self.size}×{self.size}"
        return {"path": self.path, "kind": self.kind, "n_listed": len(self), "resolution": resolution,
                "crop": crop, "resize_kernel": f"{RESIZE_KERNEL}; none when the image already has the size",
                "quantisation": "uint8, rounded to nearest", "store_dtype": self.store_dtype}

    def items(self, start: int = 0) -> Iterator[BenchItem]:
        """Items ``start``, ``start+1``, …; an unreadable image gives an item with ``error`` set (never raises)."""
        for i in range(start, len(self)):
            yield self._item(i)

    def _item(self, i: int) -> BenchItem:
        s = self.samples[i]
        item = BenchItem(index=i, id=s.id, source=s.source)
        try:
            try:
                data = s.read_bytes()
            except OSError as e:
                raise SampleError(f"unreadable file: {e}") from None
            pixels = decode_image(data)
        except SampleError as e:
            item.error = str(e)
            return item
        if self.kind == "store":
            stored = self._latents[i]
            left, top, right, bottom = stored["crop_box"]
            crop = pixels[:, top:bottom, left:right]
            out = default_output_size(*stored["latent"].shape[-2:])
            item.image = to_uint8(_resize(crop, out))
            item.latent = stored["latent"]
            item.orig_size, item.crop_box = stored["orig_size"], stored["crop_box"]
        else:
            p = preprocess(pixels, "center", self.size)
            item.image = to_uint8(p.pixels)
            item.orig_size, item.crop_box = p.orig_size, p.crop_box
        return item


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return TF.resize(x, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True).clamp_(0, 1)


def is_store(path: str) -> bool:
    """Whether ``path`` is a latent store from ``cascade encode-dataset``."""
    from datasets_tools.store import is_latent_store

    return is_latent_store(path)


def open_dataset(path: str | os.PathLike, size: int | None, limit: int | None = None) -> BenchDataset:
    """List a folder, manifest, tar shards (``size``: the square side, multiple of 32) or a latent store
    (``size`` must be ``None``: the store fixes it). ``limit`` keeps the first ``limit`` samples."""
    path = str(path)
    if is_store(path):
        if size is not None:
            raise UsageError(f"{path} is a latent store: each latent is decoded at the size it stands for "
                             "(encoder input / 0.75); leave out --size")
        from datasets_tools.dataset import LatentDataset
        from datasets_tools.store import LatentStore

        store = LatentStore.open(path)
        # Relative plan locations hang from the folder the source was last encoded from.
        by_id = {s.id: s for unit in store.read_plan(store.attrs.get("source_root")) for s in unit}
        latents = LatentDataset(path, with_captions=False)
        n = len(latents) if limit is None else min(limit, len(latents))
        samples = [by_id[latents.ids[i]] for i in range(n)]
        return BenchDataset(path, "store", None, samples, store.attrs.get("dtype", "float16"), latents)
    size = 1024 if size is None else size
    if size < 32 or size % 32:
        raise UsageError(f"--size must be a positive multiple of 32, got {size}")
    samples = list_source(path, limit)
    if not samples:
        raise UsageError(f"{path}: no images found (extensions: jpg jpeg png webp bmp tif tiff); a benchmark of no "
                         "images measures nothing")
    return BenchDataset(path, "images", size, samples)
