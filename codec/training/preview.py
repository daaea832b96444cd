"""Preview collages during training: rows of images (e.g. data, then samples) in one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def save_collage(rows: Sequence[torch.Tensor], path: Path) -> Path:
    """Save rows of RGB images ``(n,3,h,w)`` in [0,1] (all rows the same n and size) as one PNG."""
    from torchvision.utils import make_grid, save_image

    from ..files import atomic_write

    images = torch.cat([r.float().clamp(0, 1).cpu() for r in rows])
    with atomic_write(path) as tmp:
        save_image(make_grid(images, nrow=rows[0].shape[0], padding=2), str(tmp), format="png")
    return path
