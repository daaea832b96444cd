"""Shard-order reading for object stores: ShardCacheReader decodes whole shards into the rows the plain readers give,
and ShardBatchSampler's epochs are one-bucket batches covering every sample once, reproducible for resuming."""

import fsspec
import numpy as np
import pytest

from datasets_tools import LatentDataset, ShardBatchSampler, encode_dataset
from datasets_tools.fastread import ShardedReader
from datasets_tools.shardcache import ShardCacheReader
from test_dataset_helpers import make_folder


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("shardcache")
    make_folder(root / "src", 9)
    encode_dataset(root / "src", root / "out.zarr", tiny_weights, size=64, batch_size=2, workers=0, shard_size=4,
                   policy="keep-aspect", progress=False, log=lambda s: None, stage_a=True)
    return root / "out.zarr"


def test_whole_shard_reads_equal_per_sample_reads(store):
    fs = fsspec.filesystem("file")
    ds = LatentDataset(store)
    for bucket in ds.bucket_names:
        for array in ("latents", "stage_a"):
            fast = ShardedReader.try_open(store / bucket / array)
            cached = ShardCacheReader.try_open(fs, str(store / bucket / array), cache_shards=1)
            assert cached is not None
            for row in range(12):  # three shards: written rows, padding, and a shard never written
                assert np.array_equal(cached.read(row), fast.read(row))
            assert cached.shards_fetched <= 3


def test_shard_batches_cover_every_sample_once_per_bucket(store):
    ds = LatentDataset(store)
    shards = ds.shard_indices()
    assert sorted(np.concatenate(list(shards.values())).tolist()) == list(range(len(ds)))
    for workers in (0, 2, 3):
        sampler = ShardBatchSampler(ds, batch_size=2, num_workers=workers, seed=1)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(ds)))
        assert all(len({ds._bucket_of[i] for i in b}) == 1 for b in batches)
        assert list(ShardBatchSampler(ds, 2, num_workers=workers, seed=1)) == batches  # same epoch: resumable
        sampler.set_epoch(1)
        assert sorted(i for b in sampler for i in b) == list(range(len(ds)))
    dropped = list(ShardBatchSampler(ds, batch_size=3, drop_last=True))
    assert all(len(b) == 3 for b in dropped)


def test_training_batches_a_shard_cached_store_shard_by_shard(store):
    """With data.shard_cache the trainer's epochs are ShardBatchSampler's (lanes = loader workers), reproducible
    from (seed, epoch) for resuming; without it they stay BucketBatchSampler's fully random ones."""
    from codec.training.data import BucketBatchSampler, epoch_batches

    cached = LatentDataset(store, shard_cache=2)
    for lanes in (1, 2):
        expected = ShardBatchSampler(cached, 2, num_workers=lanes, seed=5, drop_last=True)
        expected.set_epoch(1)
        assert epoch_batches(cached, 2, 5, 1, lanes=lanes) == list(expected)
    plain = LatentDataset(store)
    expected = BucketBatchSampler(plain, 2, seed=5, drop_last=True)
    expected.set_epoch(1)
    assert epoch_batches(plain, 2, 5, 1, lanes=2) == list(expected)
