"""Decoding a latent store back to images: the Python API behind ``cascade decode-dataset``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

from codec.errors import UsageError
from codec.images import check_image_path, save_images
from codec.interrupts import check_interrupted
from codec.progress import progress_bar

from .dataset import LatentDataset


@dataclass
class DecodeSummary:
    """What :func:`decode_dataset` did."""

    written: int
    skipped: int
    out_dir: Path

    def line(self) -> str:
        """One line for the user."""
        return f"decoded {self.written} sample(s) into {self.out_dir} ({self.skipped} already there)"


def output_name(sample_id: str, fmt: str) -> str:
    """Where a decoded sample goes inside the output folder: its id as a relative path (``photos/a`` →
    ``photos/a.png``, so that ids from a folder source mirror its tree), then ``.fmt``. An id that is not a plain
    relative path (``..``, empty parts, a leading ``/``, a backslash, a NUL) is percent-encoded into one file
    name instead. Distinct ids always give distinct names (no ``a/x`` and ``a__x`` both to ``a__x.png``)."""
    parts = sample_id.split("/")
    if not sample_id or any(p in ("", ".", "..") for p in parts) or "\\" in sample_id or "\0" in sample_id \
            or parts[-1].startswith("%"):
        return "%" + quote(sample_id, safe="") + f".{fmt}"  # "%" marks an encoded name: no plain id gives one
    return f"{sample_id}.{fmt}"


def select_samples(dataset: LatentDataset, ids: Sequence[str] | None = None, limit: int | None = None) -> list[int]:
    """Indices of the samples to decode: those with ``ids`` (in that order; all, in store order, by default), at
    most ``limit``. An unknown id is a :class:`UsageError` naming it."""
    wanted = list(range(len(dataset)))
    if ids:
        index = {sid: i for i, sid in enumerate(dataset.ids)}
        missing = [sid for sid in ids if sid not in index]
        if missing:
            raise UsageError(f"{dataset.url} has no sample(s) with id {', '.join(missing[:10])}")
        wanted = [index[sid] for sid in ids]
    return wanted[:limit] if limit else wanted


def decode_dataset(store: str | os.PathLike, out_dir: str | os.PathLike, codec: Any, *,
                   ids: Sequence[str] | None = None, limit: int | None = None, fmt: str = "png",
                   use_captions: bool = False, progress: bool | None = None,
                   log: Callable[[str], None] | None = None, **decode_kwargs: Any) -> DecodeSummary:
    """Decode samples of the latent ``store`` with ``codec`` (a :class:`codec.Codec`) into ``out_dir/<id>.<fmt>``.

    Each latent is decoded at the size it stands for (encoder input / 0.75). Files already there are skipped, so
    an interrupted run continues where it stopped; each file is written atomically. ``use_captions`` conditions
    Stage B on each sample's stored caption. ``decode_kwargs`` go to :meth:`codec.Codec.decode` (steps, cfg, …).
    """
    out_dir = Path(out_dir)
    check_image_path(out_dir / f"x.{fmt}")
    dataset = LatentDataset(store)
    wanted = select_samples(dataset, ids, limit)
    steps = int(decode_kwargs.get("steps") or codec.sampler_defaults["steps"])
    bar = progress_bar(steps * len(wanted), "decode-dataset", unit="step", enabled=progress)
    written = skipped = 0
    try:
        for i in wanted:
            check_interrupted()  # Ctrl-C stops at the next sample even if its KeyboardInterrupt was lost
            item = dataset[i]
            target = out_dir / output_name(item["id"], fmt)
            if target.exists():
                skipped += 1
                bar.update(steps)
                continue
            if use_captions:
                decode_kwargs["caption"] = item.get("caption") or None
            images = codec.decode(item["latent"], progress=lambda *_: bar.update(1), progress_bars=progress,
                                  **decode_kwargs)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):  # a decoded file where the id needs a folder
                target = out_dir / ("%" + quote(item["id"], safe="") + f".{fmt}")
            save_images(images, target)
            written += 1
    finally:
        bar.close()
    return DecodeSummary(written, skipped, out_dir)
