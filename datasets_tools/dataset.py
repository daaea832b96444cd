"""Reading a latent store for training: ``LatentDataset`` (batched by the trainer's ``BucketBatchSampler``,
re-exported here)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from codec.errors import UsageError
from codec.training.data import BucketBatchSampler

from .fastread import ShardedReader
from .shardcache import ShardBatchSampler, ShardCacheReader
from .store import EXTRAS, LatentStore, parse_bucket

__all__ = ["FIELDS", "BucketBatchSampler", "LatentDataset", "ShardBatchSampler", "fields_of", "store_fields"]

# Item key → (array name in a bucket group, extra of the store that holds it or None for the latents).
FIELDS = {"latent": ("latents", None), "clip_text_pooled": ("clip_text_pooled", "clip"), "clip_text": ("clip_text", "clip"),
          "stage_a": ("stage_a", "stage_a")}


def fields_of(extras: dict[str, Any]) -> tuple[str, ...]:
    """The item fields a store with these ``extras`` can give: ``latent`` plus the extras' fields."""
    return tuple(f for f, (_, extra) in FIELDS.items() if extra is None or extra in extras)


def store_fields(store: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The item fields the store at ``store`` can give (for ``LatentDataset(store, fields=…)``)."""
    return fields_of(LatentStore.open(store, storage_options).extras)


class LatentDataset(torch.utils.data.Dataset):
    """Map-style dataset over the committed samples of a latent store.

    Item ``i`` is a dict: one float32 tensor per name in ``fields`` — ``latent``
    ``(16,h,w)`` (the default), and when the store holds them ``clip_text_pooled`` ``(1,C)``,
    ``clip_text`` ``(77,C)`` (CLIP text embeddings of the caption; batches give Stage C's
    ``(B,1,C)`` and ``(B,77,C)``) and ``stage_a`` ``(4,H/4,W/4)`` (Stage A latent) — plus
    ``id``, ``caption`` (when ``with_captions``), ``bucket`` ((H, W) pixels),
    ``orig_size`` ((h, w)), ``crop_box`` ((left, top, right, bottom)). Latents of an int8 store are
    dequantised with its per-channel scale and offset. Samples are ordered bucket by bucket
    (sorted names), each in plan order. Small per-sample metadata is loaded at
    construction; latents are read per item through handles opened lazily in each
    process, so the dataset is safe with ``DataLoader(num_workers>0)``. Local stores are
    read with :class:`~datasets_tools.fastread.ShardedReader` (one ``pread`` per sample),
    others through zarr — or, with ``shard_cache=n`` (n ≥ 1), a whole shard per GET with the last n shards
    of each array kept per process (:class:`~datasets_tools.shardcache.ShardCacheReader`), which is fast
    only in shard order: batch with :class:`~datasets_tools.shardcache.ShardBatchSampler`. Open the
    dataset after encoding has finished.

    For trainers: ``has_text_embeddings`` (items carry ``clip_text_pooled``) and
    ``empty_text_embedding`` (``(clip_text (77,C), clip_text_pooled (1,C))`` of the empty
    caption, stored once per store, for caption dropout; ``None`` when not asked for).
    :func:`store_fields` lists the fields a store can give.
    """

    def __init__(self, store: str | os.PathLike, buckets: list[str] | None = None, with_captions: bool = True,
                 storage_options: dict[str, Any] | None = None, fields: tuple[str, ...] = ("latent",),
                 shard_cache: int = 0):
        self.url, self.storage_options, self.with_captions = str(store), storage_options, with_captions
        self.shard_cache = shard_cache
        self.fields = tuple(fields)
        unknown = [f for f in self.fields if f not in FIELDS]
        if unknown or not self.fields:
            raise UsageError(f"fields must be a non-empty subset of {', '.join(FIELDS)}; got {list(self.fields)}")
        st = LatentStore.open(self.url, storage_options)
        # For trainers (codec.training): whether items carry text embeddings, and those of "".
        self.has_text_embeddings = "clip_text_pooled" in self.fields
        empty = st.empty_text() if {"clip_text", "clip_text_pooled"} & set(self.fields) else None
        self.empty_text_embedding = None if empty is None else tuple(torch.from_numpy(e).float() for e in empty)
        absent = sorted({FIELDS[f][1] for f in self.fields} - {None} - set(st.extras))
        if absent:
            what = " and ".join(f"{EXTRAS[e][0]} ({EXTRAS[e][1]})" for e in absent)
            raise UsageError(f"{self.url} has no {what}: it was encoded without them. Its fields are "
                             f"{', '.join(fields_of(st.extras))}; re-encode into a new store with those options to "
                             "get them.")
        self.shard_size = st.shard_size
        rows = st.visible_rows()
        if buckets is not None:
            unknown = sorted(set(buckets) - set(rows))
            if unknown:
                raise KeyError(f"{self.url} has no bucket(s) {unknown}; it has {sorted(rows)}")
            rows = {b: rows[b] for b in sorted(buckets)}
        self.bucket_names = [b for b in sorted(rows) if len(rows[b])]
        self._bucket_of = np.concatenate([np.full(len(rows[b]), i, dtype=np.int32)
                                          for i, b in enumerate(self.bucket_names)]) if self.bucket_names else \
            np.zeros(0, dtype=np.int32)
        self._row = np.concatenate([rows[b] for b in self.bucket_names]) if self.bucket_names else \
            np.zeros(0, dtype=np.int64)
        self.ids: list[str] = []
        self.captions: list[str] = []
        orig, crop = [], []
        for b in self.bucket_names:
            g, r = st.group[b], rows[b]
            self.ids += st.strings(b, "id", r)
            if with_captions:
                self.captions += st.strings(b, "caption", r)
            orig.append(g["orig_size"][:][r])
            crop.append(g["crop_box"][:][r])
        self._orig = np.concatenate(orig) if orig else np.zeros((0, 2), np.int32)
        self._crop = np.concatenate(crop) if crop else np.zeros((0, 4), np.int32)
        self._handles: dict[str, dict[str, Any]] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._row)

    def bucket_indices(self) -> dict[str, np.ndarray]:
        """Dataset indices of each bucket (for batch samplers)."""
        return {b: np.nonzero(self._bucket_of == i)[0] for i, b in enumerate(self.bucket_names)}

    def shard_indices(self) -> dict[tuple[str, int], np.ndarray]:
        """Dataset indices held by each shard ``(bucket, shard number)`` (for shard-ordered batch samplers)."""
        keys = self._bucket_of.astype(np.int64) << 40 | self._row // self.shard_size
        order = np.argsort(keys, kind="stable")
        uniq, starts = np.unique(keys[order], return_index=True)
        return {(self.bucket_names[k >> 40], k & ((1 << 40) - 1)): idx
                for k, idx in zip(uniq.tolist(), np.split(order, starts[1:]))}

    def batch_sampler(self, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                      lanes: int = 1) -> ShardBatchSampler | None:
        """The batch order this dataset reads fastest in, for trainers: with ``shard_cache`` a
        :class:`~datasets_tools.shardcache.ShardBatchSampler` (each shard fetched about once per epoch, by one of
        ``lanes`` DataLoader workers); ``None`` (any order is as fast) otherwise."""
        if self.shard_cache <= 0:
            return None
        return ShardBatchSampler(self, batch_size, num_workers=lanes, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def _reader(self, st: LatentStore, bucket: str, array: str) -> Any:
        """A function reading one row of ``bucket``'s ``array``: local pread, whole cached shards, or zarr."""
        fast = None
        if st.location.local:
            fast = ShardedReader.try_open(st.location.path / bucket / array)
        elif self.shard_cache > 0:
            fast = ShardCacheReader.try_open(st.location.fs, f"{st.location.root}/{bucket}/{array}", self.shard_cache)
        return fast.read if fast is not None else st.group[bucket][array].__getitem__

    def _arrays(self, field: str = "latent") -> dict[str, Any]:
        """Per bucket, a function reading one row of ``field``'s array (opened once per process)."""
        # Open per process: zarr stores pickle, but a fresh handle per worker avoids sharing event loops/files.
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if field not in self._handles:
            st = LatentStore.open(self.url, self.storage_options)
            array = FIELDS[field][0]
            readers = {b: self._reader(st, b, array) for b in self.bucket_names}
            quantization = st.quantization(array)
            if quantization is not None:  # int8 store: dequantise to float32 here, once per read
                readers = {b: (lambda row, read=read: quantization.dequantize(read(row)))
                           for b, read in readers.items()}
            self._handles[field] = readers
        return self._handles[field]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i = int(i) % len(self)
        name = self.bucket_names[self._bucket_of[i]]
        row = int(self._row[i])
        item: dict[str, Any] = {f: torch.from_numpy(np.asarray(self._arrays(f)[name](row))).float()  # fast f16→f32
                                for f in self.fields}
        item.update({"id": self.ids[i], "bucket": parse_bucket(name), "orig_size": tuple(int(v) for v in self._orig[i]),
                     "crop_box": tuple(int(v) for v in self._crop[i])})
        if self.with_captions:
            item["caption"] = self.captions[i]
        return item


def sample_ids(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every sample id of a store, in store order (the names ``decode-dataset --ids`` takes)."""
    return list(LatentDataset(url, storage_options=storage_options).ids)
