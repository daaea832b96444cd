"""Stores and tar sources on S3, against a local moto server on 127.0.0.1."""

import socket

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from datasets_tools import LatentDataset, LatentStore, encode_dataset, store_info  # noqa: E402
from datasets_tools.store import StoreError  # noqa: E402
from test_dataset_helpers import image_bytes, make_tar  # noqa: E402


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    import s3fs

    # botocore reads these, so plain s3:// URLs (CLI, DataLoader workers) reach the local server.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(anon=False)
    if not fs.exists("bkt"):
        fs.mkdir("bkt")
    return fs


@pytest.mark.slow  # a moto S3 server and a whole encoding job
def test_s3_tar_source_and_store(s3, tmp_path, tiny_weights):
    for k in range(2):
        make_tar(tmp_path / f"shard-{k}.tar", {f"s{k}{i}.png": image_bytes(40 + 8 * i, 64, 10 * k + i)
                                               for i in range(3)} | {f"s{k}0.txt": b"hello"})
        s3.put_file(str(tmp_path / f"shard-{k}.tar"), f"bkt/shards/shard-{k}.tar")
    out = "s3://bkt/stores/lat.zarr"
    kw = dict(size=64, batch_size=2, workers=2, shard_size=2, progress=False, log=lambda s: None)
    s = encode_dataset("s3://bkt/shards/shard-{0..1}.tar", out, tiny_weights, **kw)
    assert s.encoded == 6 and s.store["complete"] and s.store["count"] == 6
    assert s3.exists("bkt/stores/lat.zarr/commits/unit_000002.json")
    ds = LatentDataset(out)
    assert sorted(ds.ids) == [f"shard-{k}/s{k}{i}" for k in range(2) for i in range(3)]
    assert ds[ds.ids.index("shard-1/s10")]["caption"] == "hello"
    assert ds[0]["latent"].shape == (16, 2, 2)
    again = encode_dataset("s3://bkt/shards/shard-{0..1}.tar", out, tiny_weights, **kw)
    assert again.encoded == 0 and again.store["count"] == 6
    assert "samples: 6" in store_info(out)
    with pytest.raises(StoreError, match="preprocess"):
        encode_dataset("s3://bkt/shards/shard-{0..1}.tar", out, tiny_weights, **{**kw, "size": 96})
    s3.pipe("bkt/foreign/x.txt", b"x")
    with pytest.raises(StoreError, match="not a cascade-codec latent store"):
        encode_dataset("s3://bkt/shards/shard-0.tar", "s3://bkt/foreign", tiny_weights, **kw)
    assert LatentStore.open(out).attrs["complete"]


@pytest.mark.slow  # a moto S3 server and an encoding job
def test_shard_cache_reads_the_same_samples_as_the_plain_path(s3, tmp_path, tiny_weights):
    import torch

    from datasets_tools import ShardBatchSampler
    from test_dataset_helpers import make_folder

    make_folder(tmp_path / "src", 7)
    out = "s3://bkt/stores/cached.zarr"
    encode_dataset(tmp_path / "src", out, tiny_weights, size=64, batch_size=2, workers=0, shard_size=3,
                   progress=False, log=lambda s: None, dtype="int8", stage_a=True)
    fields = ("latent", "stage_a")
    plain = LatentDataset(out, fields=fields)
    cached = LatentDataset(out, fields=fields, shard_cache=2)
    expected = {plain.ids[i]: plain[i] for i in range(len(plain))}
    loader = torch.utils.data.DataLoader(cached, batch_sampler=ShardBatchSampler(cached, 2, num_workers=2, seed=3),
                                         num_workers=2)
    seen = []
    for batch in loader:
        for j, sid in enumerate(batch["id"]):
            seen.append(sid)
            for f in fields:
                assert torch.equal(batch[f][j], expected[sid][f])
    assert sorted(seen) == sorted(expected)


@pytest.mark.slow  # a moto S3 server, an encoding job and two short training runs
def test_training_from_s3_with_shard_cache_resumes_to_the_same_weights(s3, tmp_path, tiny_weights,
                                                                       tiny_text_encoder):
    """`data.shard_cache` on an S3 store: Stage B trains shard by shard through two loader workers, and a run
    stopped after its first checkpoint and started again ends with the same weights as one uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from codec.training import train
    from codec.training.stage_b_task import StageBTask
    from datasets_tools.training_data import training_dataset
    from test_dataset_helpers import make_folder

    make_folder(tmp_path / "src", 8)
    out = "s3://bkt/stores/train.zarr"
    encode_dataset(tmp_path / "src", out, tiny_weights, size=64, batch_size=2, workers=0, shard_size=3,
                   progress=False, log=lambda s: None, stage_a=True, text_encoder=tiny_text_encoder)

    def cfg(name, steps):
        return {"output_dir": str(tmp_path / name), "data": {"store": out, "shard_cache": 2, "num_workers": 2},
                "batch_size": 2, "max_steps": steps, "model": {"preset": "tiny"}, "log": {"every": 1},
                "preview": {"every": 0}, "checkpoint": {"save_every": 2}, "stage_b": {"effnet_from": "stored"}}

    train(StageBTask, cfg("a", 4), training_dataset, echo=None)
    train(StageBTask, cfg("b", 2), training_dataset, echo=None)
    train(StageBTask, cfg("b", 4), training_dataset, echo=None)
    a, b = load_file(tmp_path / "a/checkpoint/model.safetensors"), load_file(tmp_path / "b/checkpoint/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
