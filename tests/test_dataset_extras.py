"""Optional store arrays: CLIP text embeddings of the captions and Stage A latents; refusals; old stores."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_dataset_helpers import make_folder

from datasets_tools.store import store_info
from codec.codec import load_stage_a
from codec.text import TextEncoder
from datasets_tools import LatentDataset, LatentStore, StoreError, encode_dataset
from datasets_tools.encode import file_sha256, text_encoder_sha256
from datasets_tools.preprocess import preprocess

ALL = ("latent", "clip_text_pooled", "clip_text", "stage_a")


def run(src, out, weights, **kw):
    kw = {"size": 64, "batch_size": 2, "workers": 0, "shard_size": 2, "progress": False, "log": lambda s: None, **kw}
    return encode_dataset(src, out, weights, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("extras") / "src"
    make_folder(src, 5)
    (src / "img_001.txt").unlink()                       # no caption → embedding of ""
    (src / "img_002.txt").write_text("word " * 100)      # longer than 77 tokens → a warning
    return src


def test_extras_match_direct_computation(corpus, tmp_path, tiny_weights, tiny_text_encoder):
    out = tmp_path / "out.zarr"
    s = run(corpus, out, tiny_weights, dtype="float32", policy="keep-aspect", text_encoder=tiny_text_encoder,
            stage_a=True)
    assert (s.encoded, s.skipped) == (5, 0)
    ds = LatentDataset(out, fields=ALL)
    assert sorted(ds.ids) == [f"img_{i:03d}" for i in range(5)]
    text = TextEncoder.from_pretrained(tiny_text_encoder)
    stage_a = load_stage_a(tiny_weights)
    for item in ds:
        h, w = item["bucket"]
        assert item["clip_text_pooled"].shape == (1, 24) and item["clip_text"].shape == (77, 24)
        assert item["stage_a"].shape == (4, h // 4, w // 4) and item["latent"].shape == (16, h // 32, w // 32)
        caption = (corpus / f"{item['id']}.txt").read_text().strip() if item["id"] != "img_001" else ""
        assert item["caption"] == caption
        ref = text.encode([caption], warn=False)
        torch.testing.assert_close(item["clip_text_pooled"], ref.pooled[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(item["clip_text"], ref.hidden[0], rtol=1e-4, atol=1e-5)
        img = torch.from_numpy(np.array(Image.open(corpus / f"{item['id']}.png"))).permute(2, 0, 1) / 255
        pixels = preprocess(img, "keep-aspect", 64).pixels
        with torch.no_grad():
            torch.testing.assert_close(item["stage_a"], stage_a.encode(pixels[None])[0], rtol=1e-4, atol=1e-5)
    empty = ds[ds.ids.index("img_001")]["clip_text_pooled"]
    assert not torch.equal(empty, ds[ds.ids.index("img_000")]["clip_text_pooled"])
    # The embedding of "" is also stored once, for trainers' caption dropout.
    ref = text.encode([""], warn=False)
    assert ds.has_text_embeddings and ds.empty_text_embedding is not None
    torch.testing.assert_close(ds.empty_text_embedding[0], ref.hidden[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ds.empty_text_embedding[1], ref.pooled[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ds.empty_text_embedding[1], empty, rtol=1e-4, atol=1e-5)
    store = LatentStore.open(out)
    extras = store.attrs["extras"]
    assert extras["clip"]["sha256"] == text_encoder_sha256(tiny_text_encoder)
    assert extras["stage_a"]["sha256"] == file_sha256(tiny_weights / "stage_a.safetensors")
    assert extras["clip"]["dtype"] == extras["stage_a"]["dtype"] == "float32"
    assert [w[0] for w in store.table("warnings")] == ["img_002"] and "77 CLIP tokens" in store.table("warnings")[0][2]
    info = store_info(str(out))
    assert "clip_text_pooled 1×24, clip_text 77×24: CLIP text embeddings (float32)" in info
    assert "stage_a 4×16×24" in info and "Stage A latents (float32)" in info
    only = LatentDataset(out, fields=("clip_text",), with_captions=False)
    assert set(only[0]) == {"clip_text", "id", "bucket", "orig_size", "crop_box"}
    loader = torch.utils.data.DataLoader(LatentDataset(out, buckets=["b64x96"], fields=ALL), batch_size=2,
                                         num_workers=1)
    batch = next(iter(loader))
    assert batch["clip_text_pooled"].shape == (2, 1, 24) and batch["stage_a"].shape == (2, 4, 16, 24)


def test_float16_extras_are_float32_rounded(corpus, tmp_path, tiny_weights, tiny_text_encoder):
    for dtype in ("float16", "float32"):
        run(corpus, tmp_path / f"{dtype}.zarr", tiny_weights, dtype=dtype, text_encoder=tiny_text_encoder,
            stage_a=True, limit=3)
    g16 = LatentStore.open(tmp_path / "float16.zarr").group["b64x64"]
    g32 = LatentStore.open(tmp_path / "float32.zarr").group["b64x64"]
    for key in ("latents", "clip_text_pooled", "clip_text", "stage_a"):
        assert g16[key].dtype == np.float16 and g32[key].dtype == np.float32
        assert np.array_equal(g16[key][:4], g32[key][:4].astype(np.float16)), key
    assert LatentStore.open(tmp_path / "float16.zarr").attrs["extras"]["clip"]["dtype"] == "float16"


@pytest.mark.slow  # several encoding jobs
def test_mismatching_extras_are_refused(corpus, tmp_path, tiny_weights, tiny_text_encoder):
    from codec.tiny import write_tiny_text_encoder

    plain, rich = tmp_path / "plain.zarr", tmp_path / "rich.zarr"
    run(corpus, plain, tiny_weights, limit=2)
    run(corpus, rich, tiny_weights, limit=2, text_encoder=tiny_text_encoder, stage_a=True)
    with pytest.raises(StoreError, match=r"CLIP text embeddings \(--text-encoder\): the store has none, this run "
                                         r"would add them"):
        run(corpus, plain, tiny_weights, text_encoder=tiny_text_encoder)
    with pytest.raises(StoreError, match=r"Stage A latents \(--stage-a\): the store has none"):
        run(corpus, plain, tiny_weights, stage_a=True)
    with pytest.raises(StoreError, match=r"(?s)CLIP text embeddings \(--text-encoder\): the store has them.*this run "
                                         r"has none; pass --text-encoder.*Stage A latents"):
        run(corpus, rich, tiny_weights)
    other = write_tiny_text_encoder(tmp_path / "other_text", seed=1)
    with pytest.raises(StoreError, match="text encoder sha256: store has"):
        run(corpus, rich, tiny_weights, text_encoder=other, stage_a=True)
    with pytest.raises(ValueError, match=r"has no CLIP text embeddings \(--text-encoder\).*fields are latent"):
        LatentDataset(plain, fields=("latent", "clip_text"))
    with pytest.raises(ValueError, match="subset of"):
        LatentDataset(plain, fields=("latents",))
    # Nothing was written by the refused runs.
    assert LatentStore.open(plain).attrs["count"] == 2 and "clip" not in LatentStore.open(plain).extras
    # The matching options resume: the rest of the corpus is appended with its extras.
    assert run(corpus, rich, tiny_weights, text_encoder=tiny_text_encoder, stage_a=True).encoded == 3


def test_store_without_extras_attribute_still_opens_and_resumes(corpus, tmp_path, tiny_weights):
    """Stores written before extras existed have no ``extras`` attribute."""
    out = tmp_path / "old.zarr"
    run(corpus, out, tiny_weights, limit=3)
    group = LatentStore.open(out, mode="r+").group
    attrs = dict(group.attrs)
    del attrs["extras"], attrs["source_root"]
    group.attrs.clear()
    group.attrs.update(attrs)
    assert "extras" not in LatentStore.open(out).attrs
    assert len(LatentDataset(out)) == 3 and "samples: 3" in store_info(str(out))
    assert run(corpus, out, tiny_weights).encoded == 2 and len(LatentDataset(out)) == 5


def test_stage_a_from_the_diffusers_layout(corpus, tmp_path, tiny_weights):
    """``--stage-a`` also reads diffusers' ``vqgan/``; the same weights give the same Stage A latents."""
    import shutil

    from codec.layouts.convert import convert

    folder = tmp_path / "diffusers"
    convert(tiny_weights, folder, "diffusers", progress=False, log=lambda s: None)
    shutil.copy(tiny_weights / "effnet_encoder.safetensors", folder)  # diffusers ships no EfficientNet
    assert not (folder / "stage_a.safetensors").exists() and (folder / "vqgan").is_dir()
    for name, weights in (("official", tiny_weights), ("diffusers", folder)):
        run(corpus, tmp_path / f"{name}.zarr", weights, limit=2, stage_a=True, dtype="float32")
    a, b = (LatentStore.open(tmp_path / f"{n}.zarr") for n in ("official", "diffusers"))
    assert b.extras["stage_a"]["file"].startswith("vqgan/")
    assert b.extras["stage_a"]["scale_factor"] == a.extras["stage_a"]["scale_factor"] == 0.43
    assert np.array_equal(a.group["b64x64"]["stage_a"][:2], b.group["b64x64"]["stage_a"][:2])


def test_unstorable_extras_skip_the_sample_not_the_job(corpus, tmp_path, tiny_weights, tiny_text_encoder,
                                                       monkeypatch):
    """NaN from the text encoder, or Stage A values beyond float16, skip that sample (recorded), never a row half."""
    from codec.stage_a import StageA

    encode_text, encode_a = TextEncoder.encode, StageA.encode

    def nan_for_caption_3(self, captions, warn=True):
        emb = encode_text(self, captions, warn)
        for i, c in enumerate(captions):
            if c == "caption 3":
                emb.hidden[i, 5, 0] = float("nan")
        return emb

    def huge_first_of_batch(self, x):
        z = encode_a(self, x)
        z[0] *= 1e6
        return z

    monkeypatch.setattr(TextEncoder, "encode", nan_for_caption_3)
    monkeypatch.setattr(StageA, "encode", huge_first_of_batch)
    s = run(corpus, tmp_path / "out.zarr", tiny_weights, text_encoder=tiny_text_encoder, stage_a=True)
    # batches of 2 per unit of 2 (center policy, one bucket): img_000, img_002, img_004 lead their batch
    assert s.encoded == 1 and s.skipped == 4
    assert s.reasons == {"Stage A encoder output beyond the float16 range (use --dtype float32)": 3,
                         "text encoder produced NaN/inf": 1}
    store = LatentStore.open(tmp_path / "out.zarr")
    assert {i for i, _, _ in store.table("errors")} == {"img_000", "img_002", "img_003", "img_004"}
    ds = LatentDataset(tmp_path / "out.zarr", fields=ALL)
    assert ds.ids == ["img_001"] and all(torch.isfinite(ds[0][f]).all() for f in ALL)
    wide = run(corpus, tmp_path / "f32.zarr", tiny_weights, text_encoder=tiny_text_encoder, stage_a=True,
               dtype="float32")
    assert wide.encoded == 4 and wide.reasons == {"text encoder produced NaN/inf": 1}


def test_training_reads_the_extras_from_the_store(corpus, tmp_path, tiny_weights, tiny_text_encoder):
    """cascade train takes stored text embeddings (and that of "" for caption dropout) and Stage A latents
    from the store: no text encoder is configured (``weights`` unset)."""
    from codec.generation.training.stage_c_task import StageCTask
    from codec.training import ConfigError, train
    from codec.training.logs import read_log
    from codec.training.stage_b_task import StageBTask
    from datasets_tools.training_data import training_dataset

    store, plain = tmp_path / "store.zarr", tmp_path / "plain.zarr"
    run(corpus, store, tiny_weights, text_encoder=tiny_text_encoder, stage_a=True, shard_size=5)
    run(corpus, plain, tiny_weights, shard_size=5)
    for task in (StageCTask, StageBTask):
        cfg = {"output_dir": str(tmp_path / task.name), "data": {"store": str(store)}, "batch_size": 2,
               "max_steps": 2, "model": {"preset": "tiny"}, "log": {"every": 1}, "preview": {"every": 0}}
        if task is StageBTask:
            cfg["stage_b"] = {"effnet_from": "stored"}
        train(task, cfg, training_dataset, echo=None)
        assert [r["step"] for r in read_log(tmp_path / task.name)] == [1, 2]
    cfg = {"output_dir": str(tmp_path / "b2"), "data": {"store": str(plain)}, "batch_size": 2, "max_steps": 1,
           "model": {"preset": "tiny"}, "stage_b": {"effnet_from": "stored"}, "preview": {"every": 0}}
    with pytest.raises(ConfigError, match="has no stage_a; encode it with `cascade encode-dataset --stage-a`"):
        train(StageBTask, cfg, training_dataset, echo=None)
