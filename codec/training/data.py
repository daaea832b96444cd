"""Batches for training: one bucket per global batch, split between processes, resumable mid-epoch.

Every process builds the same list of global micro-batches for an epoch (:class:`BucketBatchSampler`
with the run's seed and the epoch number, incomplete batches dropped) and takes its contiguous slice
of each. The position ``(epoch, batch)`` is saved in checkpoints, so a resumed run reads exactly the
batches an uninterrupted run would have read.

Dataset items (those of ``datasets_tools``' ``LatentDataset`` and ``ImageDataset``): ``latent``
(EfficientNet latent ``(16,h,w)``), ``caption``, and when the store has them
``clip_text``/``clip_text_pooled`` (stored CLIP-G embeddings), ``clip_img`` (CLIP-L image
embedding), ``stage_a`` (Stage A latent); ``images`` (pixels) for tasks that train from images.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import torch

from ..errors import UsageError
from ..interrupts import ignore_interrupts, start_workers
from .distributed import Dist

TENSOR_KEYS = ("latent", "clip_text", "clip_text_pooled", "clip_img", "stage_a", "images")


def float_images(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """``batch`` with uint8 ``images`` (those of ``data.cache``) as float in [0,1], moved to ``device`` first so that
    on a GPU the copy is a quarter of the bytes and the conversion runs there; any other batch as it is."""
    images = batch.get("images")
    if not (torch.is_tensor(images) and images.dtype == torch.uint8):
        return batch
    from ..images import from_uint8

    if device is not None:
        images = images.to(device, non_blocking=True)
    return {**batch, "images": from_uint8(images)}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of the known keys (present in every item); keep the rest as lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key in TENSOR_KEYS and all(torch.is_tensor(v) for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices that all come from one bucket (so every batch has one latent shape).

    ``dataset`` has ``bucket_indices()``: bucket name → array of its indices (``LatentDataset``,
    ``ImageDataset``, :class:`ListDataset`).

    ``shuffle``: shuffle within buckets and the order of batches, with ``seed`` plus
    :meth:`set_epoch`'s epoch. ``drop_last``: drop each bucket's incomplete last batch.
    """

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1:
            raise UsageError(f"batch_size must be ≥ 1, got {batch_size}")
        self.groups = dataset.bucket_indices()
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffling (call once per epoch)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        batches = []
        for name in sorted(self.groups):
            idx = self.groups[name].tolist()
            if self.shuffle:
                rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                b = idx[s:s + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    batches.append(b)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        n = 0
        for idx in self.groups.values():
            n += len(idx) // self.batch_size if self.drop_last else -(-len(idx) // self.batch_size)
        return n


def epoch_batches(dataset: Any, global_batch: int, seed: int, epoch: int, shuffle: bool = True,
                  lanes: int = 1) -> list[list[int]]:
    """Global micro-batches of one epoch (all from one bucket; incomplete ones dropped). A dataset with a
    ``batch_sampler(batch_size, shuffle, seed, drop_last, lanes)`` method that returns a sampler is batched in
    that order (a latent store read by whole shards: shard by shard, ``lanes`` = DataLoader workers); any other
    in a :class:`BucketBatchSampler`'s."""
    own = getattr(dataset, "batch_sampler", None)
    sampler = own(global_batch, shuffle=shuffle, seed=seed, drop_last=True, lanes=lanes) if own else None
    if sampler is None:
        sampler = BucketBatchSampler(dataset, global_batch, shuffle=shuffle, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    if not batches:
        sizes = {k: len(v) for k, v in dataset.bucket_indices().items()}
        raise UsageError(f"no bucket of the dataset holds a full batch of {global_batch} samples (bucket sizes: "
                         f"{sizes}); lower batch_size/grad_accum_steps or add data.")
    return batches


def rank_slice(batch: list[int], d: Dist) -> list[int]:
    """This process's contiguous part of a global batch."""
    n = len(batch) // d.world_size
    return batch[d.rank * n:(d.rank + 1) * n]


def stream(dataset: Any, global_batch: int, seed: int, shuffle: bool, epoch: int, start: int, d: Dist,
           num_workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[int, int, bool, dict[str, Any]]]:
    """Yield ``(epoch, batch_index, last_of_epoch, local_batch)`` from batch ``start`` of ``epoch`` on, epoch after
    epoch (:func:`epoch_batches`), until the caller stops. One DataLoader serves every epoch, so its worker
    processes start once per run rather than once per epoch (with a small data set at a large batch every update
    was an epoch, and the GPU waited for workers to start)."""
    def positions() -> Iterator[tuple[int, int, bool, list[int]]]:
        e, s = epoch, start
        while True:
            batches = epoch_batches(dataset, global_batch, seed, e, shuffle, lanes=max(1, num_workers))
            for i in range(s, len(batches)):
                yield e, i, i == len(batches) - 1, batches[i]
            e, s = e + 1, 0

    class _Local(torch.utils.data.Sampler[list[int]]):
        def __iter__(self) -> Iterator[list[int]]:
            return (rank_slice(b, d) for *_, b in positions())

    # an own generator: a DataLoader otherwise draws its worker seed from the global RNG, which would make
    # a resumed run's dropout differ from an uninterrupted one
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_Local(), collate_fn=collate, num_workers=num_workers,
                                         pin_memory=pin_memory, worker_init_fn=ignore_interrupts,
                                         generator=torch.Generator().manual_seed(epoch * 1_000_003 + start))
    for (e, i, last, _), batch in zip(positions(), start_workers(loader)):
        yield e, i, last, batch


class ListDataset(torch.utils.data.Dataset):
    """An in-memory dataset of item dicts (tests, small experiments); one bucket per latent shape."""

    def __init__(self, items: Sequence[dict[str, Any]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(self.items[i])

    def bucket_indices(self) -> dict[str, Any]:
        """Indices grouped by the shape of ``latent`` (or ``stage_a``)."""
        import numpy as np

        groups: dict[str, list[int]] = {}
        for i, it in enumerate(self.items):
            t = it.get("latent", it.get("stage_a"))
            groups.setdefault("x".join(map(str, t.shape[-2:])), []).append(i)
        return {k: np.array(v) for k, v in groups.items()}
