"""The direct shard reader gives exactly what zarr gives, for the layouts it accepts, and declines others."""

import numpy as np
import pytest
import zarr

from datasets_tools.fastread import ShardedReader


@pytest.mark.parametrize("compressors", ["auto", None])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_matches_zarr(tmp_path, compressors, dtype):
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    a = g.create_array("latents", shape=(12, 16, 2, 3), shards=(4, 16, 2, 3), chunks=(1, 16, 2, 3), dtype=dtype,
                       fill_value=0, compressors=compressors)
    data = np.random.default_rng(0).normal(size=(12, 16, 2, 3)).astype(dtype)
    a[0:4] = data[0:4]
    a[8:10] = data[8:10]  # shard 1 never written; rows 10, 11 are empty chunks inside shard 2
    r = ShardedReader.try_open(tmp_path / "s.zarr" / "latents")
    assert r is not None
    for i in range(12):
        got = r.read(i)
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, a[i]), i
    assert not r.read(5).any() and not r.read(11).any()


def test_declines_other_layouts(tmp_path):
    g = zarr.open_group(tmp_path / "s.zarr", mode="w")
    g.create_array("plain", shape=(4, 2), chunks=(1, 2), dtype="float32")
    g.create_array("big_chunks", shape=(8, 2), shards=(4, 2), chunks=(2, 2), dtype="float32")
    assert ShardedReader.try_open(tmp_path / "s.zarr" / "plain") is None
    assert ShardedReader.try_open(tmp_path / "s.zarr" / "big_chunks") is None
    assert ShardedReader.try_open(tmp_path / "s.zarr" / "missing") is None
