"""Images (not latents) for training tasks that need pixels, e.g. ControlNet (its control is computed from them).

``ImageDataset`` lists a source with :func:`~datasets_tools.sources.list_source` (folder,
CSV/JSONL manifest, tar shards), decodes each item with :mod:`codec.images` and applies a
:mod:`~datasets_tools.preprocess` policy (default ``center``: short side → ``size``, centre
crop). Item ``i``: ``images`` ``(3,size,size)`` float in [0,1], ``caption``, ``id``. With the
``center`` policy every item is one bucket, so the training loop's bucket sampler applies.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .preprocess import known_buckets, preprocess
from .sources import SourceError, list_source


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of preprocessed images and captions from an image source."""

    has_text_embeddings = False

    def __init__(self, source: str | os.PathLike, size: int = 768, policy: str = "center"):
        if policy != "center":
            raise ValueError(f"ImageDataset supports the 'center' policy only (one bucket per run), got {policy!r}")
        self.source, self.size, self.policy = str(source), size, policy
        self.samples = list_source(source)
        if not self.samples:
            raise SourceError(f"{source}: no images found; add images (jpg, png, webp …) or fix the path")
        (h, w), = known_buckets(policy, size)
        self.bucket = f"{h}x{w}"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, object]:
        from codec.images import load_image, pil_to_tensor

        sample = self.samples[i]
        caption, _ = sample.read_caption()
        pixels = pil_to_tensor(load_image(sample.read_bytes(), name=sample.source))
        return {"images": preprocess(pixels, self.policy, self.size).pixels, "caption": caption, "id": sample.id}

    def bucket_indices(self) -> dict[str, np.ndarray]:
        """All indices in the one bucket (``HxW`` in pixels)."""
        return {self.bucket: np.arange(len(self.samples))}
