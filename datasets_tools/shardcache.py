"""Reading a latent store on an object store (S3, GCS, …) at training speed: whole shards, cached, in shard order.

A read from an object store costs a request (~1 ms to a local server, tens of ms to a real one), and
zarr-python makes two per sample (the shard's index, then the chunk). Training needs a random order,
not random access to single samples, so this module does what streaming loaders (webdataset,
MosaicML streaming) do, on the store as it is:

* :class:`ShardCacheReader` fetches a whole shard object with one GET (S samples: at 768² and float16,
  256 × 18 KB = 4.7 MB) and keeps the last few decoded in memory;
* :class:`ShardBatchSampler` orders an epoch so that each shard is fetched once, by one DataLoader worker:
  shards are shuffled (seed + epoch), dealt to ``num_workers`` lanes, each lane's rows shuffled shard by
  shard and cut into one-bucket batches, and the lanes' batches interleaved so that DataLoader's
  round-robin hands worker w the batches of lane w. Like any batch sampler it is resumable: the same
  (seed, epoch, num_workers) gives the same batches, so a trainer skips the ones it has done.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .fastread import ShardLayout


class ShardCacheReader:
    """Row reads of one sharded array on an fsspec filesystem, one GET per shard, ``cache_shards`` kept decoded."""

    def __init__(self, fs: Any, folder: str, layout: ShardLayout, cache_shards: int = 2):
        self.fs, self.folder, self.layout, self.cache_shards = fs, folder.rstrip("/"), layout, max(1, cache_shards)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bytes_fetched = 0
        self.shards_fetched = 0

    @classmethod
    def try_open(cls, fs: Any, folder: str, cache_shards: int = 2) -> "ShardCacheReader | None":
        """A reader for the array at ``folder`` (fsspec path) when its layout is the one we write, else ``None``."""
        import json

        try:
            layout = ShardLayout.from_metadata(json.loads(fs.cat_file(f"{folder.rstrip('/')}/zarr.json")))
        except (OSError, ValueError):
            return None
        return None if layout is None else cls(fs, folder, layout, cache_shards)

    def _shard(self, shard: int) -> np.ndarray:
        rows = self._cache.get(shard)
        if rows is not None:
            self._cache.move_to_end(shard)
            return rows
        try:
            data = self.fs.cat_file(f"{self.folder}/{self.layout.shard_key(shard)}")
        except FileNotFoundError:  # never written: every row is the fill value
            rows = np.full((self.layout.shard_rows, *self.layout.shape[1:]), self.layout.fill_value,
                           dtype=self.layout.dtype)
        else:
            self.bytes_fetched += len(data)
            self.shards_fetched += 1
            rows = self.layout.decode_shard(data)
        self._cache[shard] = rows
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return rows

    def read(self, row: int) -> np.ndarray:
        """Row ``row`` (a copy: callers may hand it to torch)."""
        shard, j = divmod(row, self.layout.shard_rows)
        return self._shard(shard)[j].copy()


class ShardBatchSampler(torch.utils.data.Sampler[list[int]]):
    """One-bucket batches of a :class:`~datasets_tools.dataset.LatentDataset` in shard order (see module doc).

    Use with ``LatentDataset(..., shard_cache=2)`` and ``DataLoader(dataset, batch_sampler=sampler,
    num_workers=num_workers)``: every shard is then fetched about once per epoch. ``drop_last`` drops each
    lane's incomplete last batch of a bucket. :meth:`set_epoch` reshuffles.
    """

    def __init__(self, dataset: Any, batch_size: int, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.shards = dataset.shard_indices()
        self.batch_size, self.lanes = batch_size, max(1, num_workers)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffling (call once per epoch)."""
        self.epoch = epoch

    def _lane_batches(self, shards: list[tuple[str, int]], rng: random.Random) -> list[list[int]]:
        """One lane's batches: its shards in order, each shard's rows shuffled, cut per bucket."""
        batches, pending = [], {}
        for key in shards:
            idx = self.shards[key].tolist()
            if self.shuffle:
                rng.shuffle(idx)
            buf = pending.setdefault(key[0], [])
            buf += idx
            while len(buf) >= self.batch_size:
                batches.append(buf[:self.batch_size])
                del buf[:self.batch_size]
        if not self.drop_last:
            batches += [buf for _, buf in sorted(pending.items()) if buf]
        return batches

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = sorted(self.shards)
        if self.shuffle:
            rng.shuffle(order)
        lanes = [self._lane_batches(order[w::self.lanes], rng) for w in range(self.lanes)]
        return [lane[i] for i in range(max(map(len, lanes), default=0)) for lane in lanes if i < len(lane)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
