"""Bucket creation by concurrent writers (keep-aspect buckets are created by whichever rank meets them first)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets_tools import LatentStore, encode_dataset
from test_dataset_helpers import make_folder

TORCHRUN = Path(sys.executable).parent / "torchrun"


def run(src, out, weights, **kw):
    kw = {"size": 64, "batch_size": 2, "workers": 0, "shard_size": 3, "progress": False, "log": lambda s: None,
          "policy": "keep-aspect", **kw}
    return encode_dataset(src, out, weights, **kw)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(TORCHRUN.parent)) is None, reason="no torchrun")
def test_two_ranks_create_the_same_buckets_at_once(tmp_path):
    out = tmp_path / "race.zarr"
    n = 20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    worker = Path(__file__).with_name("bucket_race_worker.py")
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(worker), str(out), str(n),
                        "--non-atomic-zarr"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 failures 0" in r.stdout and "rank 1 failures 0" in r.stdout, r.stdout
    store = LatentStore.open(out)
    assert len(store.bucket_names()) == n
    for i in range(n):
        g = store.group[f"b{32 * (i + 1)}x32"]
        assert g.attrs["bucket"] == [32 * (i + 1), 32] and g["latents"].shape == (6, 16, i + 1, 1)
        strings = {f"{c}_{part}" for c in ("id", "source", "caption") for part in ("offsets", "bytes")}
        assert set(g.array_keys()) == {"latents", "orig_size", "crop_box", *strings}
        assert np.array_equal(g["latents"][:4, 0, 0, 0], [1, 1, 2, 2])  # both ranks' rows, neither lost


def test_bucket_documents_are_identical_for_every_writer(tmp_path, tiny_weights):
    make_folder(tmp_path / "src", 2)
    run(tmp_path / "src", tmp_path / "out.zarr", tiny_weights)
    a, b = LatentStore.open(tmp_path / "out.zarr"), LatentStore.open(tmp_path / "out.zarr")
    assert a._bucket_documents((64, 96), 5) == b._bucket_documents((64, 96), 5)
    docs = a._bucket_documents((64, 96), 5)
    assert list(docs)[0] == "b64x96/zarr.json"  # the group first: a half-created bucket is listed and completed
    on_disk = (tmp_path / "out.zarr" / "b64x96" / "latents" / "zarr.json").read_bytes()
    assert a._bucket_documents((64, 96), 1)["b64x96/latents/zarr.json"] == on_disk


def test_half_created_bucket_is_completed_on_resume(tmp_path, tiny_weights):
    """A writer killed while creating a bucket leaves some array documents missing; the next run completes it."""
    src, out = tmp_path / "src", tmp_path / "out.zarr"
    make_folder(src, 6)
    run(src, out, tiny_weights, limit=3)  # one unit: buckets 64x96, 96x64, 64x64
    shutil.rmtree(out / "b96x64" / "crop_box")
    shutil.rmtree(out / "b96x64" / "latents")
    (out / "commits" / "unit_000000.json").unlink()
    s = run(src, out, tiny_weights)  # grows the plan to 2 units, so the arrays must also be resized
    assert (s.encoded, s.skipped) == (6, 0)
    clean = tmp_path / "clean.zarr"
    run(src, clean, tiny_weights)
    for name in ("b64x96", "b96x64", "b64x64"):
        g, c = LatentStore.open(out).group[name], LatentStore.open(clean).group[name]
        assert g["latents"].shape == c["latents"].shape == (6, 16, *(np.array(c.attrs["bucket"]) // 32))
        assert g["crop_box"].shape == (6, 4)
        assert np.array_equal(g["latents"][:], c["latents"][:]) and np.array_equal(g["crop_box"][:], c["crop_box"][:])
