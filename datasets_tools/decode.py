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

    Each latent is decoded at the size it stands for (encoder input / 0.75). The samples are decoded in fixed groups
    of ``decode_kwargs["batch_size"]`` (default 4; consecutive latents of one size go through Stage B together),
    each group from ``seed``, so a sample's image depends only on its group, not on what ran before: files already
    there are skipped, and an interrupted run continues where it stopped with the images it would have written
    (a group with some files missing is decoded again and only those written); each file is written atomically.
    ``use_captions`` conditions Stage B on each sample's stored caption. ``decode_kwargs`` go to
    :meth:`codec.Codec.decode` (steps, cfg, seed, batch_size, …).
    """
    out_dir = Path(out_dir)
    check_image_path(out_dir / f"x.{fmt}")
    dataset = LatentDataset(store)
    wanted = select_samples(dataset, ids, limit)
    steps = int(decode_kwargs.get("steps") or codec.sampler_defaults["steps"])
    group = int(decode_kwargs.get("batch_size") or 4)
    bar = progress_bar(steps * len(wanted), "decode-dataset", unit="step", enabled=progress)
    written = skipped = 0
    try:
        for start in range(0, len(wanted), group):
            check_interrupted()  # Ctrl-C stops at the next group even if its KeyboardInterrupt was lost
            items = [dataset[i] for i in wanted[start:start + group]]
            targets = [out_dir / output_name(item["id"], fmt) for item in items]
            missing = [not t.exists() for t in targets]
            skipped += len(items) - sum(missing)
            if not any(missing):
                bar.update(steps * len(items))
                continue
            kwargs = dict(decode_kwargs)
            if use_captions:
                captions = [item.get("caption") or "" for item in items]
                kwargs["caption"] = captions if any(captions) else None
            images = _decode_group(codec, [item["latent"] for item in items], steps, progress, bar.update, kwargs)
            for item, target, image, todo in zip(items, targets, images, missing):
                if not todo:
                    continue
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):  # a decoded file where the id needs a folder
                    target = out_dir / ("%" + quote(item["id"], safe="") + f".{fmt}")
                save_images([image], target)
                written += 1
    finally:
        bar.close()
    return DecodeSummary(written, skipped, out_dir)


def _decode_group(codec: Any, latents: list[Any], steps: int, progress: bool | None, advance: Callable[[int], Any],
                  kwargs: dict[str, Any]) -> list[Any]:
    """Decode one group of latents (each ``(16,h,w)`` or ``(1,16,h,w)``) as one call of ``codec.decode``, one random
    stream from the seed: runs of consecutive latents of one size are stacked into one batch. ``advance(n)`` is
    called after each sampling step with the number of images it moved on. Returns one image per latent."""
    import torch

    runs: list[list[Any]] = []
    for z in latents:
        z = z if z.ndim == 4 else z[None]
        if runs and runs[-1][0].shape == z.shape:
            runs[-1].append(z)
        else:
            runs.append([z])
    calls = iter([len(run) for run in runs for _ in range(steps)])
    stacked = [torch.cat(run) for run in runs]
    return codec.decode(stacked if len(stacked) > 1 else stacked[0], progress=lambda *_: advance(next(calls, 0)),
                        progress_bars=progress, **kwargs)
