"""Store format version 2 is plain Zarr v3: tensorstore alone reads all of a store (latents, extras, strings, index,
tables) and agrees with LatentDataset. Version-1 stores still read, are not extended, and `cascade upgrade-store`
converts them in place, with the same result however often it is interrupted."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_dataset_helpers import make_folder

from codec.cli import main
from datasets_tools import LatentDataset, LatentStore, StoreError, encode_dataset
from datasets_tools.store import STRING_ARRAYS, TABLE_COLUMNS, TABLES, store_info
from datasets_tools.string_columns import bytes_name, decode_strings, encode_strings, offsets_name
from datasets_tools.upgrade import upgrade_store

ts = pytest.importorskip("tensorstore")

ALL = ("latent", "clip_text_pooled", "clip_text", "stage_a")
CORE_TYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
              "float64", "complex64", "complex128"}


def run(src, out, weights, **kw):
    kw = {"size": 64, "batch_size": 2, "workers": 0, "shard_size": 2, "progress": False, "log": lambda s: None, **kw}
    return encode_dataset(src, out, weights, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five images in three buckets (keep-aspect), a non-ASCII caption, a missing one, one too long for CLIP, and
    an empty file (an error)."""
    src = tmp_path_factory.mktemp("format") / "src"
    make_folder(src, 5)
    (src / "img_001.txt").unlink()
    (src / "img_002.txt").write_text("word " * 100)
    (src / "img_003.txt").write_text("café ☕ 東京 — naïve", encoding="utf-8")
    (src / "zero.png").write_bytes(b"")
    return src


@pytest.fixture(scope="module")
def v2_store(corpus, tmp_path_factory, tiny_weights, tiny_text_encoder):
    out = tmp_path_factory.mktemp("v2") / "out.zarr"
    s = run(corpus, out, tiny_weights, policy="keep-aspect", text_encoder=tiny_text_encoder, stage_a=True)
    assert (s.encoded, s.skipped) == (5, 1)
    return out


# ----------------------------------------------------------------- reading with tensorstore alone
def ts_read(path: Path, index=()) -> np.ndarray:
    """Read an array of the store with tensorstore (no cascade-codec, no zarr-python)."""
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True).result()
    return np.asarray(arr[index].read().result() if index != () else arr.read().result())


def ts_string(folder: Path, column: str, row: int) -> str:
    """String ``row`` of a column, as FORMAT.md tells a reader to get it."""
    start, end = ts_read(folder / f"{column}_offsets", row)
    return bytes(ts_read(folder / f"{column}_bytes", slice(int(start), int(end)))).decode("utf-8")


def read_with_tensorstore(out: Path) -> dict:
    """Everything a reader needs from a finished store, read as FORMAT.md describes."""
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attrs["format"] == "cascade-codec-latents" and attrs["format_version"] == 2
    samples = {}
    for name in attrs["buckets"]:
        b = out / name
        for row in ts_read(b / "index").tolist():
            sid = ts_string(b, "id", row)
            samples[sid] = {"latent": ts_read(b / "latents", row), "stage_a": ts_read(b / "stage_a", row),
                            "clip_text_pooled": ts_read(b / "clip_text_pooled", row),
                            "clip_text": ts_read(b / "clip_text", row),
                            "caption": ts_string(b, "caption", row), "source": ts_string(b, "source", row),
                            "orig_size": tuple(ts_read(b / "orig_size", row).tolist()),
                            "crop_box": tuple(ts_read(b / "crop_box", row).tolist()), "bucket": name}
    tables = {t: [tuple(ts_string(out / t, c, i) for c in TABLE_COLUMNS)
                  for i in range(ts_read(out / t / "id_offsets").shape[0])] for t in TABLES}
    empty = (ts_read(out / "clip_empty" / "clip_text"), ts_read(out / "clip_empty" / "clip_text_pooled"))
    return {"attrs": attrs, "samples": samples, "tables": tables, "empty": empty}


def test_every_array_has_a_core_zarr_v3_type_and_opens_in_tensorstore(v2_store):
    arrays = [p.parent for p in v2_store.rglob("zarr.json") if json.loads(p.read_text())["node_type"] == "array"]
    assert {a.name for a in arrays} >= {"latents", "index", "id_offsets", "id_bytes", "caption_bytes", "source_bytes"}
    for a in arrays:
        meta = json.loads((a / "zarr.json").read_text())
        assert meta["data_type"] in CORE_TYPES, a
        # A bucket's bytes arrays are sparse (2³² bytes per unit): only their start is read; other arrays whole.
        ts_read(a, slice(0, min(16, meta["shape"][0]))) if a.name.endswith("_bytes") else ts_read(a)


def test_tensorstore_reads_everything_latentdataset_reads(v2_store, corpus):
    got = read_with_tensorstore(v2_store)
    ds = LatentDataset(v2_store, fields=ALL)
    store = LatentStore.open(v2_store)
    assert sorted(got["samples"]) == sorted(ds.ids) == [f"img_{i:03d}" for i in range(5)]
    assert len({s["bucket"] for s in got["samples"].values()}) == 3
    for i in range(len(ds)):
        item, mine = ds[i], got["samples"][ds.ids[i]]
        for field in ALL:
            assert np.array_equal(item[field].numpy(), mine[field].astype(np.float32)), (ds.ids[i], field)
        assert (item["caption"], item["orig_size"], item["crop_box"]) == \
            (mine["caption"], mine["orig_size"], mine["crop_box"])
        assert mine["source"] == f"{ds.ids[i]}.png"
    assert got["samples"]["img_003"]["caption"] == "café ☕ 東京 — naïve"
    assert got["samples"]["img_001"]["caption"] == ""
    assert got["tables"]["errors"] == store.table("errors") == [("zero", "zero.png", got["tables"]["errors"][0][2])]
    assert got["tables"]["errors"][0][2].startswith("empty file")
    assert got["tables"]["warnings"] == store.table("warnings") and [w[0] for w in got["tables"]["warnings"]] == \
        ["img_002"]
    assert all(np.array_equal(a.astype(np.float32), b.numpy()) for a, b in zip(got["empty"], ds.empty_text_embedding))
    assert got["attrs"]["count"] == 5 and got["attrs"]["errors"] == 1


def test_string_codec_round_trips():
    strings = ["", "a", "café ☕", "", "東京" * 50]
    offsets, data = encode_strings(strings, base=1 << 32)
    assert offsets.dtype == np.int64 and data.dtype == np.uint8 and offsets.shape == (5, 2)
    assert decode_strings(offsets, data, base=1 << 32) == strings
    assert encode_strings([])[0].shape == (0, 2)


# ----------------------------------------------------------------- version 1
def make_v1(out: Path) -> None:
    """Turn a version-2 store into the version-1 store the previous cascade-codec wrote from the same input: string
    columns as zarr-python ``str`` arrays with that writer's chunking, ``format_version`` 1."""
    store = LatentStore.open(out, mode="r+")
    S = store.shard_size
    columns = [(b, c, (S,), (S,)) for b in store.bucket_names() for c in STRING_ARRAYS] + \
        [(t, c, None, None) for t in TABLES for c in TABLE_COLUMNS]
    values = {(g, c): store.strings(g, c) for g, c, _, _ in columns}
    for g, c, shards, chunks in columns:
        group, v = store.group[g], values[g, c]
        del group[offsets_name(c)], group[bytes_name(c)]
        a = group.create_array(c, shape=(len(v),), shards=shards, chunks=chunks or (max(1, min(len(v), 1 << 14)),),
                               dtype=str, fill_value="")
        if v:
            a[:] = np.array(v, dtype=object)
    store.group.attrs.put({**store.attrs, "format_version": 1})


def tree(out: Path) -> dict[str, str]:
    """sha256 of every file of a store."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file()}


@pytest.fixture()
def v1_store(v2_store, tmp_path):
    out = tmp_path / "v1.zarr"
    shutil.copytree(v2_store, out)
    make_v1(out)
    return out


def contents(out: Path) -> tuple:
    ds = LatentDataset(out, fields=ALL)
    store = LatentStore.open(out)
    return ([(ds.ids[i], ds[i]["caption"], [ds[i][f].numpy().tobytes() for f in ALL]) for i in range(len(ds))],
            {b: store.strings(b, "source", r) for b, r in store.visible_rows().items()},
            store.table("errors"), store.table("warnings"))


def test_version_1_still_reads_and_is_not_extended(v1_store, v2_store, corpus, tiny_weights, tiny_text_encoder):
    assert LatentStore.open(v1_store).format_version == 1
    assert contents(v1_store) == contents(v2_store)
    assert "v1" in store_info(v1_store) and "cascade upgrade-store" in store_info(v1_store)
    before = tree(v1_store)
    with pytest.raises(StoreError, match=r"format-version-1 store.*cascade upgrade-store .*v1\.zarr"):
        run(corpus, v1_store, tiny_weights, policy="keep-aspect", text_encoder=tiny_text_encoder, stage_a=True)
    assert tree(v1_store) == before
    with pytest.raises(Exception, match="string"):  # the reason for version 2
        ts_read(v1_store / "b64x96" / "id")


def test_upgrade_command_converts_in_place(v1_store, v2_store, corpus, tiny_weights, tiny_text_encoder):
    r = CliRunner().invoke(main, ["upgrade-store", str(v1_store), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "upgraded" in r.output and "from format version 1 to 2" in r.output
    attrs = LatentStore.open(v1_store).attrs
    assert attrs["format_version"] == 2 and attrs["upgraded_from"] == 1 and "upgrade" not in attrs
    # Byte for byte what encode-dataset writes at version 2, apart from the root attributes.
    upgraded, direct = tree(v1_store), tree(v2_store)
    assert {k: v for k, v in upgraded.items() if k != "zarr.json"} == {k: v for k, v in direct.items()
                                                                        if k != "zarr.json"}
    assert read_with_tensorstore(v1_store)["samples"].keys() == read_with_tensorstore(v2_store)["samples"].keys()
    assert contents(v1_store) == contents(v2_store)
    r = CliRunner().invoke(main, ["upgrade-store", str(v1_store)])
    assert r.exit_code == 0 and "already format version 2; nothing to do" in r.output
    assert tree(v1_store) == upgraded
    s = run(corpus, v1_store, tiny_weights, policy="keep-aspect", text_encoder=tiny_text_encoder, stage_a=True)
    assert s.encoded == 0


class Killed(BaseException):
    """Stands for kill -9 at a hook point (nothing after it runs)."""


def test_interrupted_upgrade_finishes_with_the_same_store(v2_store, tmp_path):
    clean = tmp_path / "clean.zarr"
    shutil.copytree(v2_store, clean)
    make_v1(clean)
    start = tmp_path / "v1.zarr"
    shutil.copytree(clean, start)
    points: list[str] = []
    upgrade_store(clean, progress=False, hook=points.append)
    expected = tree(clean)
    kinds = {"unit" if p.split()[-2] == "unit" else p.split()[-1] for p in points}
    assert kinds == {"unit", "verified", "removed"} and len(points) > 30
    chosen = [points[0], points[1], points[len(points) // 2], points[-2], points[-1],
              next(p for p in points if p.startswith("upgrade errors/"))]
    for point in chosen:
        out = tmp_path / "case.zarr"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(start, out)

        def kill(at: str, point=point) -> None:
            if at == point:
                raise Killed(at)

        with pytest.raises(Killed):
            upgrade_store(out, progress=False, hook=kill)
        with pytest.raises(StoreError, match=r"upgrade to format version 2 was interrupted.*cascade upgrade-store"):
            LatentDataset(out)
        r = CliRunner().invoke(main, ["upgrade-store", str(out), "--no-progress"])
        assert r.exit_code == 0, (point, r.output)
        assert tree(out) == expected, point


@pytest.mark.filterwarnings("ignore:Object at caption is not recognized")  # the half-deleted array
def test_upgrade_after_a_half_deleted_version_1_array(v1_store, tmp_path):
    """Killed while deleting a verified column's old array: only part of it is gone; the rerun finishes."""
    clean = tmp_path / "clean.zarr"
    shutil.copytree(v1_store, clean)
    upgrade_store(clean, progress=False)

    def kill(at: str) -> None:
        if at == "upgrade b64x96/caption verified":
            raise Killed(at)

    with pytest.raises(Killed):
        upgrade_store(v1_store, progress=False, hook=kill)
    (v1_store / "b64x96" / "caption" / "zarr.json").unlink()
    upgrade_store(v1_store, progress=False)
    assert tree(v1_store) == tree(clean)


def test_upgrade_refuses_foreign_and_newer_stores(v2_store, tmp_path):
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["purpose"] = "someone else's"
    r = CliRunner().invoke(main, ["upgrade-store", str(tmp_path / "other.zarr")])
    assert r.exit_code == 1 and "not a cascade-codec latent store" in r.output and "Traceback" not in r.output
    newer = tmp_path / "newer.zarr"
    shutil.copytree(v2_store, newer)
    meta = json.loads((newer / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 3
    (newer / "zarr.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(main, ["upgrade-store", str(newer)])
    assert r.exit_code == 1 and "format version 3" in r.output and "Upgrade cascade-codec" in r.output
    r = CliRunner().invoke(main, ["upgrade-store", str(tmp_path / "missing.zarr")])
    assert r.exit_code == 1 and "no zarr.json" in r.output


def test_format_md_reading_examples_run(v2_store):
    """The two 'Reading without cascade-codec' snippets of FORMAT.md work as written (paths swapped in)."""

    text = (Path(__file__).resolve().parents[1] / "datasets_tools" / "FORMAT.md").read_text(encoding="utf-8")
    section = text[text.index("## Reading without cascade-codec"):text.index("## Version 1 and")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 2
    caption = LatentDataset(v2_store, buckets=["b64x96"]).captions[0]
    for code in blocks:
        scope: dict = {}
        exec(code.replace("data.zarr", str(v2_store)).replace("b768x768", "b64x96"), scope)  # noqa: S102
        assert scope["caption"] == caption
