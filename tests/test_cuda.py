"""The GPU path (marked ``cuda``; skipped where torch sees no GPU, as on CI): device placement, CPU-vs-GPU agreement of
the codec and of the dataset encoder, and a training run on the device with the in-memory image cache.

``CASCADE_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py`` runs the same checks with the CPU standing in for the
GPU, so the tests themselves can be checked on a machine without one.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

DEVICE = os.environ.get("CASCADE_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The four sample photos, centre squares at 256²."""
    from pathlib import Path

    folder = tmp_path_factory.mktemp("photos")
    for path in sorted((Path(__file__).resolve().parent.parent / "scripts" / "samples").glob("*.jpg")):
        with Image.open(path) as im:
            side = min(im.size)
            im.convert("RGB").crop((0, 0, side, side)).resize((256, 256), Image.BICUBIC).save(folder / f"{path.stem}.png")
    return folder


def test_mini_codec_on_the_device_matches_the_cpu_in_fp32(photos):
    from codec import Codec

    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    cpu = Codec.from_pretrained("mini", device="cpu", dtype=torch.float32)
    dev = Codec.from_pretrained("mini", device=DEVICE, dtype=torch.float32)
    assert next(dev.stage_b.parameters()).device.type == torch.device(DEVICE).type
    z_cpu, z_dev = cpu.encode(images), dev.encode(images)
    assert z_dev.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(z_dev.cpu(), z_cpu, rtol=1e-3, atol=1e-3)
    # same latents and seed → the same picture on either device (same noise: drawn on the CPU generator)
    x_cpu = cpu.decode(z_cpu, seed=0, output="tensor").float().cpu()
    x_dev = dev.decode(z_cpu.to(DEVICE), seed=0, output="tensor").float().cpu()
    mse = float(((x_cpu - x_dev) ** 2).mean())
    assert 10 * np.log10(1 / max(mse, 1e-12)) > 40, mse


def test_dataset_encoder_on_the_device_agrees_with_the_cpu_within_the_storage_error(photos, tmp_path):
    from codec.weights import BUILTIN_MODELS
    from datasets_tools import LatentDataset, encode_dataset

    kw = {"size": 256, "batch_size": 2, "workers": 0, "progress": False, "log": lambda s: None, "dtype": "float32"}
    weights = BUILTIN_MODELS["mini"].folder
    encode_dataset(photos, tmp_path / "cpu.zarr", weights, device="cpu", **kw)
    encode_dataset(photos, tmp_path / "dev.zarr", weights, device=DEVICE, **kw)
    a, b = LatentDataset(tmp_path / "cpu.zarr"), LatentDataset(tmp_path / "dev.zarr")
    assert sorted(a.ids) == sorted(b.ids) and len(a) == 4
    by_id = {it["id"]: it["latent"] for it in b}
    for item in a:
        # float16 storage rounds to 2^-11 relative; the devices' arithmetic must stay well inside that
        torch.testing.assert_close(by_id[item["id"]], item["latent"], rtol=1e-3, atol=2e-3)


def test_training_runs_on_the_device_from_the_image_cache(photos, tmp_path):
    import json

    from codec.training import train
    from codec.training.codec_tasks import StageATask
    from datasets_tools.training_data import training_dataset

    cfg = {"output_dir": str(tmp_path / "run"), "data": {"images": str(photos), "image_size": 256, "cache": True},
           "batch_size": 4, "max_steps": 4, "model": {"preset": "tiny"}, "mixed_precision": "auto",
           "log": {"every": 1}, "optim": {"lr": 1e-3, "warmup_updates": 0}, "checkpoint": {"save_every": 2},
           "stage_a": {"crop": 64}}
    train(StageATask, cfg, training_dataset, echo=None, device=DEVICE)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)


def test_speed_benchmark_runs_its_cases_and_the_whole_decode_on_the_device(tmp_path):
    import json

    from benchmarks import speed

    out = tmp_path / "speed.json"
    code = speed.main(["--tasks", "effnet,stage_a,decode", "--effnet-size", "64", "--effnet-batches", "1",
                       "--stage-a-size", "64", "--decode-size", "128", "--decode-check-size", "128", "--decode-steps",
                       "2", "--repeats", "1", "--device", DEVICE, "-o", str(out)])
    report = json.loads(out.read_text())
    cases = report["cases"]
    assert code == 0, [(c["task"], c["status"], c.get("error")) for c in cases]
    assert report["environment"]["device"] == DEVICE and {c["task"] for c in cases} == {"effnet", "stage_a", "decode"}
    assert all(c["device"] == DEVICE and c["parity"]["pass"] for c in cases)
    timed = [d for c in cases for d in c["impls"].values() if d["timed"]]
    assert all(d["median_s"] > 0 for d in timed)
    if DEVICE.startswith("cuda"):  # peak memory is the GPU's, per worker process
        assert all(d["peak_device_memory"] > 0 for d in timed)
