"""Training the codec from scratch (tiny configs): `stage-a` and `codec` tasks, resume with BatchNorm statistics,
the scaled encoder presets, and the export into the shipped file layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from codec import weights as W
from codec.effnet import EfficientNetEncoder
from codec.presets import create_model, get_preset
from codec.training import train
from codec.training.codec_tasks import CodecTask, StageATask
from datasets_tools.training_data import training_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight 64² crops of the sample photos (real images, small)."""
    folder = tmp_path_factory.mktemp("images")
    for i, path in enumerate(sorted((ROOT / "scripts" / "samples").glob("*.jpg"))):
        with Image.open(path) as im:
            im = im.convert("RGB")
            for j, box in enumerate([(0, 0, 200, 200), (100, 100, 300, 300)]):
                im.crop(box).resize((64, 64), Image.BICUBIC).save(folder / f"{i}_{j}.png")
    return folder


def stage_a_config(out, images, **over):
    cfg = {"output_dir": str(out), "data": {"images": str(images), "image_size": 64}, "batch_size": 4,
           "max_steps": 6, "model": {"preset": "tiny"}, "mixed_precision": "no", "log": {"every": 1},
           "optim": {"lr": 3e-3, "warmup_updates": 0}, "checkpoint": {"save_every": 2},
           "stage_a": {"crop": 32}}
    cfg.update(over)
    return cfg


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


class Kill(Exception):
    pass


def test_stage_a_learns_and_resumes_bit_identically_with_batchnorm_statistics(tmp_path, images):
    train(StageATask, stage_a_config(tmp_path / "a", images, max_steps=12), training_dataset, echo=None)
    losses = [r["loss"] for r in read_log(tmp_path / "a")]
    assert sum(losses[-3:]) < sum(losses[:3]), losses

    def kill(step):
        if step == 5:
            raise Kill

    with pytest.raises(Kill):
        train(StageATask, stage_a_config(tmp_path / "b", images, max_steps=12), training_dataset, hook=kill,
              echo=None)
    train(StageATask, stage_a_config(tmp_path / "b", images, max_steps=12), training_dataset, echo=None)
    a = load_file(tmp_path / "a/checkpoint/model.safetensors")
    b = load_file(tmp_path / "b/checkpoint/model.safetensors")
    bn = [k for k in a if "running_mean" in k]
    assert bn, "BatchNorm statistics must be saved with the weights"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the file is a Stage A weights file with its config: it loads as one
    from codec.stage_a import StageA

    model, header = W.load_configured(StageA, tmp_path / "a/checkpoint/model.safetensors", None, torch.float32, "cpu")
    assert header.config["c_hidden"] == 32 and model.encode(torch.rand(1, 3, 32, 32)).shape == (1, 4, 8, 8)


def test_stage_a_vq_option_trains_through_the_quantiser(tmp_path, images):
    cfg = stage_a_config(tmp_path, images, max_steps=2, stage_a={"crop": 32, "quantize": True})
    train(StageATask, cfg, training_dataset, echo=None)
    assert all(r["loss"] > 0 for r in read_log(tmp_path))


def test_scaled_encoder_preset_round_trips_and_default_is_torchvision_v2_s(tmp_path):
    import torchvision

    official = EfficientNetEncoder()
    ref = torchvision.models.efficientnet_v2_s(weights=None).features
    assert [k for k in official.backbone.state_dict()] == list(ref.state_dict())
    mini = create_model("efficientnet_mini")
    assert mini(torch.rand(1, 3, 192, 192)).shape == (1, 16, 6, 6)
    assert sum(p.numel() for p in mini.parameters()) < sum(p.numel() for p in official.parameters()) / 20
    path = W.save_module(mini, tmp_path / "e.safetensors", config=mini.config)
    back, _ = W.load_configured(EfficientNetEncoder, path, None, torch.float32, "cpu")
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(back(x), mini.eval()(x))


def test_codec_task_trains_encoder_and_stage_b_and_exports_the_package_layout(tmp_path, images):
    from codec import Codec

    stage_a = W.save_module(create_model("stage_a_tiny"), tmp_path / "stage_a_run.safetensors", config=get_preset("stage_a_tiny").kwargs())
    cfg = {"output_dir": str(tmp_path / "c"), "data": {"images": str(images), "image_size": 64}, "batch_size": 4,
           "max_steps": 3, "model": {"preset": "tiny"}, "mixed_precision": "no", "log": {"every": 1},
           "checkpoint": {"save_every": 3},
           "codec": {"stage_a": str(stage_a), "crop": 64, "encoder_preset": "efficientnet_mini"}}
    before = create_model("efficientnet_mini")
    train(CodecTask, cfg, training_dataset, echo=None)
    log = read_log(tmp_path / "c")
    assert len(log) == 3 and all(r["loss"] > 0 for r in log)
    state = load_file(tmp_path / "c/checkpoint/model.safetensors")
    assert any(k.startswith("effnet.") for k in state) and any(k.startswith("stage_b.") for k in state)
    # the encoder really trained (its weights moved from any fresh initialisation's scale)
    w = state["effnet.backbone.0.0.weight"]
    assert w.shape == before.backbone[0][0].weight.shape

    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/export_mini.py"), "codec", str(tmp_path / "c"),
                        str(stage_a), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.glob("*.safetensors")} == {
        W.STAGE_A_FILE, W.EFFNET_FILE, "stage_b_mini.safetensors", W.EMPTY_CAPTION_FILE}
    codec = Codec.from_pretrained(out, device="cpu")  # the mini Stage B is found without naming its size
    assert codec.stage_b.config.c_hidden == [8, 16, 32, 32]
    assert codec.sampling == {"x0_clamp": 3.0}  # the exported Stage B names its own sampler default
    z = codec.encode(torch.rand(1, 3, 64, 64))
    assert z.shape == (1, 16, 1, 1)
    assert torch.equal(codec.effnet.mapper[0].weight, state["effnet.mapper.0.weight"])
    img = codec.decode(z, steps=2, output="tensor")
    assert img.shape == (1, 3, 43, 43) and torch.isfinite(img).all()


def test_unreadable_images_are_skipped_and_recorded_not_fatal(tmp_path, images):
    import shutil

    from datasets_tools.image_dataset import ImageDataset

    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    (folder / "0_0b_text.png").write_text("not an image")
    (folder / "0_0c_empty.jpg").write_bytes(b"")
    good = (folder / "1_0.png").read_bytes()
    (folder / "1_0b_truncated.png").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (40, 90)).save(folder / "2_0b_small.png")
    ds = ImageDataset(folder, size=64, errors_file=tmp_path / "e.jsonl", min_size=48)
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert all("_0b_" not in x and "_0c_" not in x for x in ids)  # each bad one replaced by the next readable
    assert ids == [ds[i]["id"] for i in range(len(ds))]  # deterministically
    reasons = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in reasons) == ["0_0b_text.png", "0_0c_empty.jpg", "1_0b_truncated.png",
                                                    "2_0b_small.png"]
    assert {r["reason"].split(": ")[1] for r in reasons} == {"not an image", "empty file", "unreadable image",
                                                             "too small"}
    # a whole training run goes through them and lists them in its output folder
    cfg = stage_a_config(tmp_path / "run", folder, max_steps=3, batch_size=len(ds) - 1)
    train(StageATask, cfg, training_dataset, echo=None)
    assert (tmp_path / "run" / "skipped.jsonl").is_file() and len(read_log(tmp_path / "run")) == 3


def test_sampler_x0_clamp_is_off_by_default_and_bounds_x0_when_set():
    from codec.diffusion import sample

    def wild(x, r, **_):  # an epsilon far off: x0 = (x − b·ε)/a is huge at the first step (a ≈ 0.01)
        return torch.full_like(x, 3.0)

    seen = []
    sample(wild, {}, shape=(1, 4, 8, 8), steps=3, generator=torch.Generator().manual_seed(0),
           callback=lambda i, x0, x: seen.append(float(x0.abs().max())))
    assert seen[0] > 100
    seen.clear()
    out = sample(wild, {}, shape=(1, 4, 8, 8), steps=3, generator=torch.Generator().manual_seed(0), x0_clamp=3.0,
                 callback=lambda i, x0, x: seen.append(float(x0.abs().max())))
    assert max(seen) <= 3.0 and float(out.abs().max()) <= 3.0
