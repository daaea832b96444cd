"""Images (not latents) for training tasks that need pixels, e.g. ControlNet (its control is computed from them).

``ImageDataset`` lists a source with :func:`~datasets_tools.sources.list_source` (folder,
CSV/JSONL manifest, tar shards), decodes each item with :mod:`codec.images` and applies a
:mod:`~datasets_tools.preprocess` policy (default ``center``: short side → ``size``, centre
crop). Item ``i``: ``images`` ``(3,size,size)`` float in [0,1], ``caption``, ``id``. With the
``center`` policy every item is one bucket, so the training loop's bucket sampler applies.

An unreadable image (corrupt, truncated, empty, not an image, decompression bomb), or one with a
side below ``min_size`` (the official ControlNet recipe keeps images of at least 768²), never stops a
training run: item ``i`` is then the next readable one (``i+1``, ``i+2`` …, the same every time,
so resumed runs see the same data), and the skipped file is recorded once per process as a JSON
line ``{"id", "source", "reason"}`` in ``errors_file`` (when given) and on standard error.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from codec.errors import UsageError

from .preprocess import known_buckets, preprocess
from .sources import SourceError, list_source


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of preprocessed images and captions from an image source."""

    has_text_embeddings = False

    def __init__(self, source: str | os.PathLike, size: int = 768, policy: str = "center",
                 errors_file: str | os.PathLike | None = None, min_size: int = 0):
        self.errors_file = None if errors_file is None else str(errors_file)
        self.min_size = min_size
        self._reported: set[str] = set()
        if policy != "center":
            raise UsageError(f"ImageDataset supports the 'center' policy only (one bucket per run), got {policy!r}")
        self.source, self.size, self.policy = str(source), size, policy
        self.samples = list_source(source)
        if not self.samples:
            raise SourceError(f"{source}: no images found; add images (jpg, png, webp …) or fix the path")
        (h, w), = known_buckets(policy, size)
        self.bucket = f"{h}x{w}"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, object]:
        from codec.images import ImageReadError, load_image, pil_to_tensor

        for k in range(len(self.samples)):
            sample = self.samples[(i + k) % len(self.samples)]
            try:
                image = load_image(sample.read_bytes(), name=sample.source)
            except (ImageReadError, OSError) as e:
                self._skip(sample, str(e))
                continue
            if min(image.size) < self.min_size:
                self._skip(sample, f"{sample.source}: too small: {image.width}×{image.height}, a side is below "
                                   f"data.min_size {self.min_size}")
                continue
            pixels = pil_to_tensor(image)
            caption, _ = sample.read_caption()
            return {"images": preprocess(pixels, self.policy, self.size).pixels, "caption": caption, "id": sample.id}
        raise SourceError(f"{self.source}: none of its {len(self.samples)} images can be read")

    def _skip(self, sample, reason: str) -> None:
        """Record a skipped sample once per process (JSON line in ``errors_file``, and standard error)."""
        import json
        import sys

        if sample.id in self._reported:
            return
        self._reported.add(sample.id)
        print(f"skipped image {reason}", file=sys.stderr)
        if self.errors_file is not None:
            with open(self.errors_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"id": sample.id, "source": sample.source, "reason": reason}) + "\n")

    def bucket_indices(self) -> dict[str, np.ndarray]:
        """All indices in the one bucket (``HxW`` in pixels)."""
        return {self.bucket: np.arange(len(self.samples))}


class CachedImages(torch.utils.data.Dataset):
    """An image dataset decoded once into memory (``data.cache: true``): item ``i`` is the wrapped dataset's item
    ``i`` with ``images`` as a uint8 ``(3,H,W)`` slice of one tensor (rounded to uint8 after the resize; exact when
    the images already have the size). Reading an item then costs nothing — no decoding, no worker processes, a
    quarter of the float bytes to copy — and the training loop turns the batch into floats on its device. For image
    sets that fit in memory: ``N·3·H·W`` bytes (695 images of 320² take 213 MB)."""

    def __init__(self, dataset: ImageDataset, progress: bool | None = None):
        from codec.images import to_uint8
        from codec.progress import progress_bar

        self._buckets = dataset.bucket_indices()
        self.pixels: torch.Tensor | None = None
        self.rest: list[dict[str, object]] = []
        bar = progress_bar(len(dataset), "decode images into memory", unit="img", enabled=progress)
        for i in range(len(dataset)):
            bar.update(1)
            item = dict(dataset[i])
            pixels = to_uint8(item.pop("images"))
            if self.pixels is None:
                self.pixels = torch.empty((len(dataset), *pixels.shape), dtype=torch.uint8)
            self.pixels[i] = pixels
            self.rest.append(item)
        bar.close()

    def __len__(self) -> int:
        return len(self.rest)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"images": self.pixels[i], **self.rest[i]}

    def bucket_indices(self) -> dict[str, np.ndarray]:
        """The wrapped dataset's buckets."""
        return self._buckets
