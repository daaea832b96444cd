"""Latents files: what ``cascade encode`` writes and ``cascade decode`` reads.

``.safetensors`` (format ``cascade-codec latents v1``): one tensor ``latents`` ``(N,16,h,w)`` when all latents
have one shape, else ``latents.0``, ``latents.1``, … ``(1,16,h,w)``; metadata ``sources`` (JSON list of the
input names), ``sizes`` (JSON list of ``[height, width]`` of the originals), ``encoder_scale``, ``model`` (the
weights that encoded them, as given: ``mini``, a repo id or a folder) and ``tool``.
``.npy``: one array ``(N,16,h,w)``, nothing else (sizes are then not known).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import UsageError, WeightsError
from .files import atomic_write, check_input

FORMAT = "cascade-codec latents v1"
SUFFIXES = (".safetensors", ".npy")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass
class LatentsFile:
    """The contents of a latents file: the latents, one ``(1|N,16,h,w)`` tensor per group, and what was recorded
    about them (``None`` where the file does not say)."""

    latents: list[torch.Tensor]
    sizes: list[list[int]] | None = None
    sources: list[str] | None = None
    encoder_scale: float | None = None
    model: str | None = None


def check_latents_path(path: str | os.PathLike) -> Path:
    """``path`` if it ends in a latents suffix, else a :class:`UsageError` (checked before any work is done)."""
    p = Path(path)
    if p.suffix not in SUFFIXES:
        raise UsageError(f"{p}: a latents file must end in .safetensors or .npy")
    return p


def save_latents(path: str | os.PathLike, latents: Sequence[torch.Tensor], sources: Sequence[str],
                 sizes: Sequence[Sequence[int]], encoder_scale: float, model: str | None = None) -> Path:
    """Write ``latents`` (each ``(1|N,16,h,w)``) with their sources, original sizes and the ``model`` that made
    them to ``path`` (.safetensors or .npy), atomically. A ``.npy`` file holds one array and nothing else, so all
    latents must then have one shape, and sizes and model are not kept."""
    import numpy as np
    from safetensors.torch import save_file

    from . import __version__

    path = check_latents_path(path)
    same = len({tuple(z.shape[1:]) for z in latents}) == 1
    with atomic_write(path) as tmp:
        if path.suffix == ".npy":
            if not same:
                raise UsageError("images of different sizes give latents of different shapes, which a .npy file "
                                 "cannot hold; write .safetensors instead")
            with open(tmp, "wb") as f:
                np.save(f, torch.cat(list(latents)).cpu().numpy())
        else:
            tensors = {"latents": torch.cat(list(latents)).contiguous()} if same else \
                {f"latents.{i}": z.contiguous() for i, z in enumerate(latents)}
            meta = {"sources": json.dumps(list(sources)), "sizes": json.dumps([list(s) for s in sizes]),
                    "encoder_scale": str(encoder_scale), "format": FORMAT, "tool": f"cascade-codec {__version__}"}
            if model:
                meta["model"] = model
            save_file(tensors, str(tmp), metadata=meta)
    return path


def load_latents(path: str | os.PathLike) -> LatentsFile:
    """Read a latents file written by :func:`save_latents` (or any ``.npy`` array) as float32."""
    import numpy as np

    from .weights import iter_tensors, read_header

    path = check_input(path, "give a latents file (.safetensors or .npy) written by `cascade encode`")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable array is the same sentence to the user
            raise UsageError(f"{path}: not a readable .npy array ({e})") from None
        return LatentsFile([torch.from_numpy(arr).float()])
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise UsageError(f"{path} is an image, not a latents file; `cascade reconstruct {path} -o OUT` encodes and "
                         "decodes an image, `cascade encode` makes a latents file")
    try:
        header = read_header(path)
    except WeightsError as e:
        reason = str(e).replace(" Download it again.", "")
        raise UsageError(f"{path} is not a complete latents file ({reason}); write it again with `cascade encode`"
                         ) from None
    tensors = dict(iter_tensors(header, torch.float32))
    keys = sorted(tensors, key=lambda k: (len(k), k))
    if not keys:
        raise UsageError(f"{path} holds no tensors")
    meta = header.metadata
    sizes = json.loads(meta["sizes"]) if "sizes" in meta else None
    sources = json.loads(meta["sources"]) if "sources" in meta else None
    scale = float(meta["encoder_scale"]) if "encoder_scale" in meta else None
    return LatentsFile([tensors[k] for k in keys], sizes, sources, scale, meta.get("model"))
