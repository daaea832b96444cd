"""The encoding job and the store: round trip, readers, bad inputs, growth, refusals, dry runs, CLI errors."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from codec.cli.dataset_commands import encode_dataset_command
from datasets_tools.store import is_latent_store, store_info
from datasets_tools import BucketBatchSampler, LatentDataset, LatentStore, StoreError, encode_dataset
from codec.codec import load_encoder
from datasets_tools.preprocess import preprocess
from test_dataset_helpers import bomb_png, make_folder, noise_image


def run(src, out, weights, **kw):
    kw = {"size": 64, "batch_size": 2, "workers": 0, "shard_size": 2, "progress": False, "log": lambda s: None, **kw}
    return encode_dataset(src, out, weights, **kw)


def test_round_trip_matches_direct_encoding(tmp_path, tiny_weights):
    ids = make_folder(tmp_path / "src", 5)
    s = run(tmp_path / "src", tmp_path / "out.zarr", tiny_weights, dtype="float32")
    assert (s.encoded, s.skipped) == (5, 0) and s.store["complete"] and s.store["count"] == 5
    ds = LatentDataset(tmp_path / "out.zarr")
    assert sorted(ds.ids) == ids and len(ds) == 5
    model = load_encoder(tiny_weights)
    for item in ds:
        img = torch.from_numpy(np.array(Image.open(tmp_path / "src" / f"{item['id']}.png"))).permute(2, 0, 1) / 255
        p = preprocess(img, "center", 64)
        with torch.inference_mode():
            ref = model.encode(p.pixels[None].contiguous(memory_format=torch.channels_last)).float()[0]
        torch.testing.assert_close(item["latent"], ref, rtol=1e-5, atol=1e-6)
        assert item["caption"] == f"caption {int(item['id'][4:])}"
        assert item["orig_size"] == tuple(img.shape[-2:]) and item["crop_box"] == p.crop_box
    attrs = LatentStore.open(tmp_path / "out.zarr").attrs
    assert attrs["encoder"]["sha256"] and attrs["preprocess"]["policy"] == "center" and attrs["dtype"] == "float32"
    info = store_info(str(tmp_path / "out.zarr"))
    assert "samples: 5" in info and "b64x64: 5 samples, latents 16×2×2" in info
    assert is_latent_store(str(tmp_path / "out.zarr")) and not is_latent_store(str(tmp_path / "src"))


def test_buckets_dataloader_workers_and_sampler(tmp_path, tiny_weights):
    src = tmp_path / "src"
    make_folder(src, 9, sizes=((64, 128), (128, 64), (96, 96)))
    s = run(src, tmp_path / "out.zarr", tiny_weights, policy="buckets", size=64, shard_size=4)
    assert s.encoded == 9
    ds = LatentDataset(tmp_path / "out.zarr")
    assert set(ds.bucket_names) == {"b32x64", "b64x32", "b64x64"}
    sampler = BucketBatchSampler(ds, batch_size=2, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2)
    seen = []
    for batch in loader:
        assert len({tuple(t.shape) for t in batch["latent"]}) == 1
        h, w = batch["bucket"][0][0].item(), batch["bucket"][1][0].item()
        assert batch["latent"].shape[-2:] == (h // 32, w // 32)
        seen += batch["id"]
    assert sorted(seen) == sorted(ds.ids) and len(seen) == 9
    assert len(sampler) == 6 and len(BucketBatchSampler(ds, 2, drop_last=True)) == 3
    only = LatentDataset(tmp_path / "out.zarr", buckets=["b64x64"], with_captions=False)
    assert len(only) == 3 and "caption" not in only[0]


def _corpus(root):
    root.mkdir()
    good = noise_image(48, 80, 0)
    buf = io.BytesIO()
    good.save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image")
    (root / "bomb.png").write_bytes(bomb_png())
    good.convert("CMYK").save(root / "cmyk.jpg")
    good.convert("P").save(root / "palette.png")
    arr16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(root / "gray16.png")
    assert Image.open(root / "gray16.png").mode.startswith("I")
    good.convert("L").save(root / "gray.png")
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    good.save(root / "rotated.jpg", exif=exif)
    (root / "rotated.txt").write_bytes(b"\xff\xfe\x00bad caption")


def test_corrupt_corpus_is_skipped_or_converted(tmp_path, tiny_weights):
    _corpus(tmp_path / "src")
    s = run(tmp_path / "src", tmp_path / "out.zarr", tiny_weights, size=32, workers=2, shard_size=3)
    assert s.encoded == 6 and s.skipped == 4
    assert s.reasons == {"unreadable image": 1, "empty file": 1, "not an image": 1,
                         "too large (decompression-bomb guard)": 1}
    store = LatentStore.open(tmp_path / "out.zarr")
    errors = {i: r for i, _, r in store.table("errors")}
    assert set(errors) == {"truncated", "zero", "text", "bomb"}
    assert "truncated" in errors["truncated"]
    warnings = store.table("warnings")
    assert [w[0] for w in warnings] == ["rotated"] and "rotated.txt" in warnings[0][2]
    ds = LatentDataset(tmp_path / "out.zarr")
    by_id = {ds.ids[i]: ds[i] for i in range(len(ds))}
    assert set(by_id) == {"cmyk", "palette", "gray16", "gray", "rgba", "rotated"}
    assert by_id["rotated"]["orig_size"] == (80, 48)  # EXIF rotation applied: 48×80 stored → 80×48 upright
    assert by_id["gray"]["orig_size"] == (48, 80)
    assert all(torch.isfinite(v["latent"]).all() for v in by_id.values())
    info = store_info(str(tmp_path / "out.zarr"))
    assert "errors (skipped): 4" in info and "1 × empty file" in info


def test_rerun_is_idempotent_and_growth_appends_only_new(tmp_path, tiny_weights):
    src, out = tmp_path / "src", tmp_path / "out.zarr"
    make_folder(src, 5)
    assert run(src, out, tiny_weights, limit=3).encoded == 3
    before = LatentDataset(out)
    first = {before.ids[i]: before[i]["latent"] for i in range(len(before))}
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run(src, out, tiny_weights, limit=3)
    assert again.encoded == 0 and again.new_samples == 0 and again.store["count"] == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot  # a finished store is not touched
    make_folder(src, 3, start=5)
    (src / "img_000.txt").write_text("changed caption")  # planned samples are not redone
    grown = run(src, out, tiny_weights)
    assert grown.new_samples == 5 and grown.encoded == 5 and grown.store["count"] == 8
    after = LatentDataset(out)
    assert sorted(after.ids) == [f"img_{i:03d}" for i in range(8)]
    for i in range(len(after)):
        if after.ids[i] in first:
            assert torch.equal(after[i]["latent"], first[after.ids[i]])
    assert after[after.ids.index("img_000")]["caption"] == "caption 0"


def test_dry_run_writes_nothing(tmp_path, tiny_weights):
    make_folder(tmp_path / "src", 3)
    lines = []
    s = run(tmp_path / "src", tmp_path / "out.zarr", tiny_weights, dry_run=True, log=lines.append)
    assert s.dry_run and s.new_samples == 3 and s.units_pending == 2 and s.encoded == 0
    assert not (tmp_path / "out.zarr").exists()
    assert "would be created" in lines[0] and "2 unit(s)" in s.line()


def test_refusals(tmp_path, tiny_weights):
    make_folder(tmp_path / "src", 2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("x")
    with pytest.raises(StoreError, match="not a cascade-codec latent store"):
        run(tmp_path / "src", foreign, tiny_weights)
    assert sorted(p.name for p in foreign.iterdir()) == ["data.csv"]
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["purpose"] = "someone else's"
    with pytest.raises(StoreError, match="Zarr group but not a cascade-codec latent store"):
        run(tmp_path / "src", tmp_path / "other.zarr", tiny_weights)
    out = tmp_path / "out.zarr"
    run(tmp_path / "src", out, tiny_weights)
    with pytest.raises(StoreError, match="preprocess: store has .*'size': 64"):
        run(tmp_path / "src", out, tiny_weights, size=96)
    with pytest.raises(StoreError, match="dtype"):
        run(tmp_path / "src", out, tiny_weights, dtype="float32")
    with pytest.raises(StoreError, match="shard_size"):
        run(tmp_path / "src", out, tiny_weights, shard_size=5)


def test_cli_errors_are_sentences(tmp_path, tiny_weights):
    runner = CliRunner()
    r = runner.invoke(encode_dataset_command, [str(tmp_path / "missing"), str(tmp_path / "o.zarr"), "-w",
                                               str(tiny_weights)])
    assert r.exit_code == 1 and "no such folder or file" in r.output and "Traceback" not in r.output
    make_folder(tmp_path / "src", 2)
    r = runner.invoke(encode_dataset_command, [str(tmp_path / "src"), str(tmp_path / "o.zarr"), "-w",
                                               str(tiny_weights), "--size", "50"])
    assert r.exit_code == 1 and "multiple of 32" in r.output
    r = runner.invoke(encode_dataset_command, [str(tmp_path / "src"), str(tmp_path / "o.zarr"), "-w",
                                               str(tmp_path / "noweights")])
    assert r.exit_code == 1 and "Traceback" not in r.output and "noweights" in r.output
    r = runner.invoke(encode_dataset_command, [str(tmp_path / "src"), str(tmp_path / "o.zarr"), "-w",
                                               str(tiny_weights), "--size", "64", "--keep-aspect", "--workers", "0",
                                               "--no-progress", "--shard-size", "2"])
    assert r.exit_code == 0, r.output
    assert "encoded 2, skipped 0" in r.output
    assert json.loads((tmp_path / "o.zarr" / "zarr.json").read_text())["attributes"]["preprocess"]["policy"] == \
        "keep-aspect"
    r = runner.invoke(encode_dataset_command, ["--help"])
    assert "--dry-run" in r.output and "--shard-size" in r.output


def test_float16_store_is_float32_rounded(tmp_path, tiny_weights):
    """float16 storage = round-to-nearest of the fp32 latents (relative error ≤ 2⁻¹¹; see FORMAT.md)."""
    make_folder(tmp_path / "src", 3)
    run(tmp_path / "src", tmp_path / "f16.zarr", tiny_weights, dtype="float16")
    run(tmp_path / "src", tmp_path / "f32.zarr", tiny_weights, dtype="float32")
    g16 = LatentStore.open(tmp_path / "f16.zarr").group["b64x64"]["latents"]
    g32 = LatentStore.open(tmp_path / "f32.zarr").group["b64x64"]["latents"]
    assert g16.dtype == np.float16 and g32.dtype == np.float32
    a16, a32 = g16[:3], g32[:3]
    assert np.array_equal(a16, a32.astype(np.float16))
    assert np.abs(a16.astype(np.float32) - a32).max() <= np.abs(a32).max() * 2.0 ** -11 + 2.0 ** -24


def _by_id(out):
    ds = LatentDataset(out)
    return {ds.ids[i]: (ds[i]["latent"].numpy().tobytes(), ds[i]["caption"]) for i in range(len(ds))}


def test_plan_is_relative_and_survives_moving_the_source(tmp_path, tiny_weights):
    src, out = tmp_path / "a" / "photos", tmp_path / "out.zarr"
    make_folder(src, 6)
    (src / "sub").mkdir()
    noise_image(64, 64, 9).save(src / "sub" / "x.png")
    run(src, out, tiny_weights, limit=4)
    plan = json.loads((out / "plan" / "unit_000001.json").read_text())["samples"]
    assert [(p["id"], p["source"], p["location"], p["caption_file"]) for p in plan] == \
        [(f"img_00{i}", f"img_00{i}.png", f"img_00{i}.png", f"img_00{i}.txt") for i in (2, 3)]
    store = LatentStore.open(out)
    assert store.strings("b64x64", "source")[:2] == ["img_000.png", "img_001.png"]
    assert store.attrs["source_root"] == str(src)
    (out / "commits" / "unit_000001.json").unlink()  # as if killed before unit 1 committed
    moved = tmp_path / "b" / "renamed"
    shutil.move(str(src), str(moved))
    s = run(moved, out, tiny_weights)
    assert s.new_samples == 3 and s.encoded == 5 and s.skipped == 0  # unit 1 redone from the moved files
    clean = tmp_path / "clean.zarr"
    run(moved, clean, tiny_weights)
    assert _by_id(out) == _by_id(clean) and sorted(_by_id(out)) == [f"img_00{i}" for i in range(6)] + ["sub/x"]
    assert LatentStore.open(out).attrs["source_root"] == str(moved)
    rows = LatentStore.open(out).visible_rows()["b64x64"]
    assert sorted(LatentStore.open(out).strings("b64x64", "source", rows)) == \
        [f"img_00{i}.png" for i in range(6)] + ["sub/x.png"]


def test_plans_with_absolute_paths_still_work(tmp_path, tiny_weights):
    """Stores written before plans were relative hold absolute locations; resuming them reads those paths."""
    src, out = tmp_path / "src", tmp_path / "out.zarr"
    make_folder(src, 4)
    run(src, out, tiny_weights)
    unit = out / "plan" / "unit_000001.json"
    record = json.loads(unit.read_text())
    for p in record["samples"]:
        p.update(source=str(src / p["source"]), location=str(src / p["location"]),
                 caption_file=str(src / p["caption_file"]))
    unit.write_text(json.dumps(record))
    (out / "commits" / "unit_000001.json").unlink()
    s = run(src, out, tiny_weights)
    assert s.encoded == 2 and s.skipped == 0
    clean = tmp_path / "clean.zarr"
    run(src, clean, tiny_weights)
    assert _by_id(out) == _by_id(clean)


def _store_contents(path):
    ds = LatentDataset(path, fields=("latent", "stage_a"))
    store = LatentStore.open(path)
    items = {ds.ids[i]: ds[i] for i in range(len(ds))}
    return items, sorted(map(tuple, store.table("errors"))), sorted(map(tuple, store.table("warnings")))


@pytest.mark.parametrize("policy", ["center", "buckets", "keep-aspect"])
def test_raw_uint8_path_resizing_in_the_main_process_gives_the_same_latents(tmp_path, tiny_weights, monkeypatch,
                                                                            policy):
    """The CUDA path (workers send uint8 + geometry, the main process resizes), forced on the CPU."""
    import datasets_tools.encode as E

    src = tmp_path / "src"
    _corpus(src)  # bad files, odd modes, EXIF rotation, a bad caption
    make_folder(src, 4, sizes=((61, 97), (97, 61), (75, 75), (33, 150)))
    kw = {"policy": policy, "size": 64, "dtype": "float32", "stage_a": True, "shard_size": 3}
    default = run(src, tmp_path / "default.zarr", tiny_weights, **kw)
    monkeypatch.setattr(E, "_resize_on_device", lambda device: True)
    raw = run(src, tmp_path / "raw.zarr", tiny_weights, workers=1, **kw)
    assert (raw.encoded, raw.skipped, raw.reasons) == (default.encoded, default.skipped, default.reasons)
    assert default.encoded == 10 and default.skipped == 4
    a, a_err, a_warn = _store_contents(tmp_path / "default.zarr")
    b, b_err, b_warn = _store_contents(tmp_path / "raw.zarr")
    assert set(a) == set(b) and a_err == b_err and a_warn == b_warn
    for i in a:
        assert (a[i]["orig_size"], a[i]["crop_box"], a[i]["bucket"]) == (b[i]["orig_size"], b[i]["crop_box"],
                                                                           b[i]["bucket"])
        torch.testing.assert_close(b[i]["latent"], a[i]["latent"], rtol=0, atol=1e-5)
        torch.testing.assert_close(b[i]["stage_a"], a[i]["stage_a"], rtol=0, atol=1e-5)


def test_raw_path_failure_in_the_main_process_is_recorded_not_fatal(tmp_path, tiny_weights, monkeypatch):
    import datasets_tools.encode as E

    make_folder(tmp_path / "src", 4)
    real = E.apply_geometry

    def flaky(x, g):
        if g.orig_size == (96, 64):
            raise RuntimeError("out of memory")
        return real(x, g)

    monkeypatch.setattr(E, "_resize_on_device", lambda device: True)
    monkeypatch.setattr(E, "apply_geometry", flaky)
    s = run(tmp_path / "src", tmp_path / "out.zarr", tiny_weights)
    assert s.encoded + s.skipped == 4 and s.skipped >= 1
    assert s.reasons == {"unexpected error": s.skipped}
    errors = LatentStore.open(tmp_path / "out.zarr").table("errors")
    assert all("RuntimeError: out of memory" in r for _, _, r in errors)
