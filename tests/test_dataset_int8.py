"""8-bit latent stores (`encode-dataset --dtype int8`): quantised on write with the store's per-channel scale and
offset, dequantised by LatentDataset, readable by tensorstore as FORMAT.md says, and part of the store's identity."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_dataset_helpers import make_folder

from datasets_tools import LatentDataset, LatentStore, StoreError, encode_dataset
from datasets_tools.fastread import ShardedReader
from datasets_tools.quantize import Q_MAX, ChannelQuantization


def run(src, out, weights, **kw):
    kw = {"size": 64, "batch_size": 2, "workers": 0, "shard_size": 2, "progress": False, "log": lambda s: None, **kw}
    return encode_dataset(src, out, weights, **kw)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_weights):
    """The same 5 images encoded as float32 and as int8 (with Stage A latents)."""
    root = tmp_path_factory.mktemp("int8")
    make_folder(root / "src", 5)
    for dtype in ("float32", "int8"):
        run(root / "src", root / f"{dtype}.zarr", tiny_weights, dtype=dtype, stage_a=True)
    return root


def test_quantization_round_trip_bound():
    q = ChannelQuantization.symmetric(3, 6.0)
    x = np.random.default_rng(0).normal(0, 2, (4, 3, 5, 5)).astype(np.float32)
    lo, hi = -Q_MAX * q.scale[0], Q_MAX * q.scale[0]
    err = np.abs(q.dequantize(q.quantize(x)) - np.clip(x, lo, hi))
    assert q.quantize(x).dtype == np.int8 and err.max() <= q.scale[0] / 2 * (1 + 1e-6)
    assert q.clamped(x) == np.count_nonzero(np.abs(x) > hi) > 0
    back = ChannelQuantization.from_json(json.loads(json.dumps(q.to_json())))  # float32 values survive JSON
    assert np.array_equal(back.scale, q.scale) and np.array_equal(back.offset, q.offset)


def test_int8_store_is_the_float32_store_quantised(stores):
    f32, i8 = LatentStore.open(stores / "float32.zarr"), LatentStore.open(stores / "int8.zarr")
    q = i8.quantization()
    assert q is not None and f32.quantization() is None
    a32, a8 = f32.group["b64x64"]["latents"][:5], i8.group["b64x64"]["latents"][:5]
    assert a8.dtype == np.int8 and np.array_equal(a8, q.quantize(a32))  # exactly what the writer's rule gives
    assert i8.group["b64x64"]["stage_a"].dtype == np.float16  # extras stay float16 in an int8 store
    assert i8.attrs["extras"]["stage_a"]["dtype"] == "float16"
    clamped = sum(r.get("clamped", 0) for r in i8.commit_records().values())
    assert clamped == q.clamped(a32) == i8.attrs["clamped"]
    from datasets_tools import store_info

    assert f"int8 range: {clamped:,} of {5 * 16 * 2 * 2:,} latent values" in store_info(stores / "int8.zarr")
    assert "int8 range" not in store_info(stores / "float32.zarr")
    d32, d8 = LatentDataset(stores / "float32.zarr"), LatentDataset(stores / "int8.zarr")
    assert d32.ids == d8.ids
    scale = float(q.scale[0])
    for i in range(len(d8)):
        x, y = d32[i]["latent"].numpy(), d8[i]["latent"]
        assert y.dtype.is_floating_point and str(y.dtype) == "torch.float32"
        expected = np.clip(x, -Q_MAX * scale, Q_MAX * scale)
        assert np.abs(y.numpy() - expected).max() <= scale / 2 * (1 + 1e-5)


def test_fast_reader_and_zarr_agree_on_int8(stores):
    folder = stores / "int8.zarr" / "b64x64" / "latents"
    fast = ShardedReader.try_open(folder)
    assert fast is not None and fast.dtype == np.int8
    st = LatentStore.open(stores / "int8.zarr")
    for row in range(5):
        assert np.array_equal(fast.read(row), st.group["b64x64"]["latents"][row])


def test_dtype_is_part_of_the_identity(stores, tmp_path, tiny_weights):
    for stored, other in (("int8", "float16"), ("float32", "int8")):
        with pytest.raises(StoreError, match=f"dtype: store has '{stored}', this run '{other}'"):
            run(stores / "src", stores / f"{stored}.zarr", tiny_weights, dtype=other, stage_a=True)
    again = run(stores / "src", stores / "int8.zarr", tiny_weights, dtype="int8", stage_a=True)
    assert again.encoded == 0 and again.store["count"] == 5


def test_quantization_is_fixed_at_creation(stores, tmp_path, tiny_weights):
    """Writers use the scale recorded in the store, not the tool's default: a grown store keeps its quantisation."""
    import shutil

    shutil.copytree(stores / "src", tmp_path / "src")
    make_folder(tmp_path / "src", 2, start=5)
    for dtype in ("float32", "int8"):
        shutil.copytree(stores / f"{dtype}.zarr", tmp_path / f"{dtype}.zarr")
    meta = json.loads((tmp_path / "int8.zarr" / "zarr.json").read_text())
    meta["attributes"]["quantization"]["latents"]["scale"] = [0.5] * 16
    (tmp_path / "int8.zarr" / "zarr.json").write_text(json.dumps(meta))
    for dtype in ("float32", "int8"):
        assert run(tmp_path / "src", tmp_path / f"{dtype}.zarr", tiny_weights, dtype=dtype, stage_a=True).encoded == 2
    st = LatentStore.open(tmp_path / "int8.zarr")
    assert np.all(st.quantization().scale == 0.5)
    new32 = LatentStore.open(tmp_path / "float32.zarr").group["b64x64"]["latents"][6:8]
    assert np.array_equal(st.group["b64x64"]["latents"][6:8], ChannelQuantization.symmetric(16, 63.5).quantize(new32))


def test_tensorstore_reads_and_dequantises_as_format_md_says(stores):
    ts = pytest.importorskip("tensorstore")
    out = stores / "int8.zarr"
    text = (Path(__file__).resolve().parents[1] / "datasets_tools" / "FORMAT.md").read_text(encoding="utf-8")
    section = text[text.index("## Reading without cascade-codec"):text.index("## Version 1 and")]
    ds = LatentDataset(out, buckets=["b64x64"])
    for code in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        scope: dict = {}
        exec(code.replace("data.zarr", str(out)).replace("b768x768", "b64x64"), scope)  # noqa: S102
        assert np.array_equal(np.asarray(scope["latent"]), ds[0]["latent"].numpy())
        assert scope["latent"].dtype == np.float32
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "b64x64" / "latents")}},
                  open=True).result()
    assert arr.dtype.name == "int8"
