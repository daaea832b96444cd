"""Training the codec from scratch (tiny configs): `stage-a` and `codec` tasks, resume with BatchNorm statistics,
the scaled encoder presets, and the export into the shipped file layout."""

import json
import math
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
from codec.training.codec_tasks import CodecTask, DecoderTask, StageATask
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


def test_cached_images_train_exactly_as_decoded_ones_with_uint8_items(tmp_path, images):
    """data.cache: the images decoded once into memory as uint8 (64² files at image_size 64: no resize, so the
    rounding is exact); the run's weights equal those of a run that decodes every batch."""
    from datasets_tools.image_dataset import CachedImages, ImageDataset

    cached = CachedImages(ImageDataset(images, size=64), progress=False)
    item = cached[3]
    assert item["images"].dtype == torch.uint8 and item["images"].shape == (3, 64, 64)
    assert torch.equal(item["images"].float() / 255, ImageDataset(images, size=64)[3]["images"])
    train(StageATask, stage_a_config(tmp_path / "plain", images), training_dataset, echo=None)
    train(StageATask, stage_a_config(tmp_path / "cached", images, data={"images": str(images), "image_size": 64,
                                                                         "cache": True}), training_dataset, echo=None)
    a = load_file(tmp_path / "plain/checkpoint/model.safetensors")
    b = load_file(tmp_path / "cached/checkpoint/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(tmp_path / "plain")] == [r["loss"] for r in read_log(tmp_path / "cached")]


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


@pytest.mark.slow  # trains, exports and decodes; one update's numbers are checked in the fast run
def test_codec_task_trains_encoder_and_stage_b_and_exports_the_package_layout(tmp_path, images):
    from codec import Codec

    stage_a = W.save_module(create_model("stage_a_tiny"), tmp_path / "stage_a_run.safetensors", config=get_preset("stage_a_tiny").kwargs())
    cfg = {"output_dir": str(tmp_path / "c"), "data": {"images": str(images), "image_size": 64}, "batch_size": 4,
           "max_steps": 3, "model": {"preset": "tiny"}, "mixed_precision": "no", "log": {"every": 1},
           "checkpoint": {"save_every": 3}, "prediction": "v",
           "codec": {"stage_a": str(stage_a), "crop": 64, "encoder_preset": "efficientnet_mini"}}
    before = create_model("efficientnet_mini")
    train(CodecTask, cfg, training_dataset, echo=None)
    log = read_log(tmp_path / "c")
    assert len(log) == 3 and all(r["loss"] > 0 for r in log)
    state = load_file(tmp_path / "c/checkpoint/model.safetensors")
    assert any(k.startswith("effnet.") for k in state) and any(k.startswith("stage_b.") for k in state)
    assert state["effnet.backbone.0.0.weight"].shape == before.backbone[0][0].weight.shape
    # that an update moves the encoder by the gradient of the right loss: test_codec_step_updates_encoder_…

    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/export_mini.py"), "codec", str(tmp_path / "c"),
                        str(stage_a), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.glob("*.safetensors")} == {
        W.STAGE_A_FILE, W.EFFNET_FILE, "stage_b_mini.safetensors", W.EMPTY_CAPTION_FILE}
    codec = Codec.from_pretrained(out, device="cpu")  # the mini Stage B is found without naming its size
    assert codec.stage_b.config.c_hidden == [8, 16, 32, 32]
    # the exported Stage B names its own sampler defaults, the run's prediction among them, and decode uses them
    assert codec.sampling["prediction"] == "v" and codec.sampler_defaults["prediction"] == "v"
    assert set(codec.sampling) == {"prediction", "steps", "sampler", "cfg"}
    calls = []
    codec.stage_b.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    z = codec.encode(torch.rand(1, 3, 64, 64))
    assert z.shape == (1, 16, 1, 1)
    assert torch.equal(codec.effnet.mapper[0].weight, state["effnet.mapper.0.weight"])
    img = codec.decode(z, output="tensor")
    assert img.shape == (1, 3, 43, 43) and torch.isfinite(img).all()
    # a probe of batch 1 (the memory check), then its steps, one pass each (cfg 1: no unconditional pass)
    assert calls == [1] + [1] * codec.sampling["steps"]
    assert torch.equal(codec.decode(z, output="tensor"), img)  # same seed, same image
    calls.clear()
    codec.decode(z, steps=2, cfg=1.1, output="tensor")  # given arguments win
    assert calls == [2, 2]  # (the memory probe ran once, in the first decode)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_codec_step_updates_encoder_and_stage_b_by_the_gradient_of_the_p2_weighted_loss(
        tmp_path, images, monkeypatch, prediction):
    """One ``codec`` update, checked against the equations rather than a shape. The loop noises x0 on the cosine
    schedule, x_t = √ᾱ(t)·x0 + √(1−ᾱ(t))·ε, and conditions the model on t (r); the loss is
    L = mean_i[(1−ᾱ(t_i)) · mean((ε̂_i − ε_i)²)] (P2 weight 1/(1+SNR) = 1−ᾱ) with ε̂ = StageB(x_t, r, E(images)·keep,
    clip) — the encoder E inside the graph; AdamW's first step with no decay moves every trained weight by
    −lr·g/(|g|+eps), g = ∂L/∂θ. Both the encoder's and Stage B's weights must have moved exactly so. With
    ``prediction: v`` the target is v = √ᾱ·ε − √(1−ᾱ)·x0 instead of ε."""
    import copy

    from codec.training import codec_tasks

    stage_a = W.save_module(create_model("stage_a_tiny"), tmp_path / "stage_a.safetensors",
                            config=get_preset("stage_a_tiny").kwargs())
    # From scratch Stage B's output head starts at zero (official init), so no gradient reaches the encoder in the
    # first update; start from a Stage B whose head is not zero.
    torch.manual_seed(0)
    stage_b = W.save_module(create_model("stage_b_tiny"), tmp_path / "stage_b.safetensors",
                            config=get_preset("stage_b_tiny").kwargs())
    # eps ≫ |g|: the first Adam step is then nearly proportional to g (not just its sign), so the loss's value
    # matters and not only the sign of its gradient
    lr, eps = 0.1, 0.1
    cfg = {"output_dir": str(tmp_path / "c"), "data": {"images": str(images), "image_size": 64}, "batch_size": 4,
           "max_steps": 1, "mixed_precision": "no", "prediction": prediction,
           "model": {"preset": "tiny", "checkpoint": str(stage_b), "dropout": 0.0},
           "log": {"every": 1}, "checkpoint": {"save_every": 1},
           "optim": {"lr": lr, "eps": eps, "weight_decay": 0.0, "warmup_updates": 0, "grad_clip": None},
           "codec": {"stage_a": str(stage_a), "crop": 64, "encoder_preset": "efficientnet_mini",
                     "encoder_keep": 1.0}}
    seen = {}
    build, inputs, noise = codec_tasks.CodecTask.build, codec_tasks.CodecTask.inputs, codec_tasks.CodecTask.noise

    def spy_build(self, dataset):
        module = build(self, dataset)
        seen["start"] = copy.deepcopy(module)  # the weights before the update
        real_forward = module.forward

        def spy_forward(x, r, **kw):
            seen["forward"] = (x.detach().clone(), r.detach().clone(), torch.get_rng_state())
            return real_forward(x, r, **kw)

        module.forward = spy_forward
        return module

    def spy_inputs(self, batch, rand):
        seen["inputs"] = inputs(self, batch, rand)
        return seen["inputs"]

    def spy_noise(self, x0, rand):
        seen["noise"] = noise(self, x0, rand)
        return seen["noise"]

    monkeypatch.setattr(codec_tasks.CodecTask, "build", spy_build)
    monkeypatch.setattr(codec_tasks.CodecTask, "inputs", spy_inputs)
    monkeypatch.setattr(codec_tasks.CodecTask, "noise", spy_noise)
    train(CodecTask, cfg, training_dataset, echo=None)

    x0, cond = seen["inputs"]
    eps_true, (x_t, r, rng) = seen["noise"], seen["forward"]
    assert 0.02 < r.min() and r.max() < 0.98  # inside the unclamped schedule, where the noise condition is t itself
    ab = torch.tensor([_alpha_bar(float(t)) for t in r]).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps_true, rtol=1e-5, atol=1e-5)

    model = seen["start"].requires_grad_(True)  # every weight the loss reaches, whatever the task froze
    torch.set_rng_state(rng)
    effnet = model.effnet.encode(cond["images"]) * cond["keep"].view(-1, 1, 1, 1)
    pred = model.stage_b(x_t, r, effnet, cond["clip"])
    target = eps_true if prediction == "epsilon" else ab.sqrt() * eps_true - (1 - ab).sqrt() * x0
    loss = ((1 - ab.view(-1)) * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
    names = [k for k, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()], allow_unused=True)
    after = load_file(tmp_path / "c/checkpoint/model.safetensors")
    before = dict(model.named_parameters())
    untrained = [k for k in names if k not in after]
    assert not untrained, f"{len(untrained)} weights were not trained, e.g. {untrained[:3]}"
    expected = {name: -lr * g / (g.abs() + eps) if g is not None else torch.zeros_like(before[name])
                for name, g in zip(names, grads)}
    moved = {name: after[name] - before[name].detach() for name in names}
    # one scale for all: some gradients are zero in exact arithmetic (a bias feeding a BatchNorm) and ~1e-9 in floats
    scale = max(e.abs().max().item() for e in expected.values())
    error = {name: (moved[name] - expected[name]).abs().max().item() / scale for name in names}
    encoder = [k for k in names if k.startswith("effnet.")]
    assert max(error[k] for k in encoder) < 1e-4, "the encoder's update is not −lr·g/(|g|+eps): " + ", ".join(
        f"{k} {error[k]:.2g}" for k in sorted(encoder, key=error.get)[-3:])
    assert max(error.values()) < 1e-4, "Stage B's update is not −lr·g/(|g|+eps): " + ", ".join(
        f"{k} {error[k]:.2g}" for k in sorted(error, key=error.get)[-3:])
    assert max(moved[k].abs().max().item() for k in encoder) > 0.1 * scale  # and the encoder did move


def _alpha_bar(t: float, s: float = 0.008) -> float:
    """ᾱ(t) of the unshifted cosine schedule (improved DDPM), written out rather than taken from codec.diffusion."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2


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


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_sampler_reads_v_and_epsilon_models_alike(prediction):
    """A model that knows the answer x* (it returns ε = (x − √ᾱ x*)/√(1−ᾱ), or v = (√ᾱ x − x*)/√(1−ᾱ), for the ᾱ of
    its noise condition) must be sampled to x* under either reading, deterministic or not, in 1 step or several."""
    from codec.diffusion import CosineSchedule, sample

    answer = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def oracle(x, r):
        ab = torch.sigmoid(CosineSchedule()(r)).view(-1, 1, 1, 1)  # ᾱ = sigmoid(logSNR); r is the unshifted t
        a, b = ab.sqrt(), (1 - ab).sqrt()
        return (x - a * answer) / b if prediction == "epsilon" else (a * x - answer) / b

    for steps, sampler in ((1, "ddim"), (5, "ddim"), (5, "ddpm")):
        out = sample(oracle, {}, shape=answer.shape, steps=steps, sampler=sampler, prediction=prediction,
                     generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, answer, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prediction 'x0' is not one of"):
        sample(oracle, {}, shape=answer.shape, steps=1, prediction="x0")


def test_decoder_task_fine_tunes_only_stage_a_decoder_on_what_the_codec_generates(tmp_path, images, tiny_weights):
    """`cascade train decoder`: the encoder and Stage B of a codec folder frozen, Stage A's encoder frozen, only its
    decoder (up_blocks, out_block) moves; the file written is a whole Stage A that the codec then decodes with."""
    from codec import Codec

    stage_a = tiny_weights / W.STAGE_A_FILE
    cfg = {"output_dir": str(tmp_path / "d"), "data": {"images": str(images), "image_size": 64}, "batch_size": 2,
           "max_steps": 3, "mixed_precision": "no", "model": {"preset": "tiny", "checkpoint": str(stage_a)},
           "optim": {"lr": 1e-2, "warmup_updates": 0}, "log": {"every": 1}, "checkpoint": {"save_every": 3},
           "decoder": {"codec": str(tiny_weights), "crop": 64, "decode_crop": 32}}
    train(DecoderTask, cfg, training_dataset, echo=None)
    assert len(read_log(tmp_path / "d")) == 3
    before, after = load_file(stage_a), load_file(tmp_path / "d/checkpoint/model.safetensors")
    assert after.keys() == before.keys()
    moved = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    assert moved and all(k.startswith(("up_blocks.", "out_block.")) for k in moved), sorted(moved)[:5]
    assert any(k.startswith("out_block.") for k in moved) and any(k.startswith("up_blocks.") for k in moved)
    folder = tmp_path / "pkg"
    folder.mkdir()
    for f in tiny_weights.iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    (folder / W.STAGE_A_FILE).unlink()
    (folder / W.STAGE_A_FILE).symlink_to(tmp_path / "d/checkpoint/model.safetensors")
    codec = Codec.from_pretrained(folder, device="cpu")
    assert torch.equal(codec.stage_a.out_block[0].weight, after["out_block.0.weight"].float())
    assert torch.isfinite(codec.decode(torch.randn(1, 16, 2, 2), steps=1, output="tensor")).all()
    with pytest.raises(Exception, match="is not a folder"):
        train(DecoderTask, {**cfg, "output_dir": str(tmp_path / "e"), "decoder": {"codec": str(stage_a)}},
              training_dataset, echo=None)


def test_end_to_end_task_trains_the_codec_through_its_reconstruction_and_exports_a_codec_folder(tmp_path, images):
    """`cascade train end-to-end`: encoder, Stage B and Stage A's decoder learn from the reconstruction's error
    (Stage A's encoder and every BatchNorm statistic stay as they were); `export_mini.py end-to-end` writes a codec
    folder whose models are the trained ones and whose sampler defaults are the source codec's."""
    from codec import Codec
    from codec.training.codec_tasks import EndToEndTask

    source = ROOT / "codec" / "mini"
    cfg = {"output_dir": str(tmp_path / "e"), "data": {"images": str(images), "image_size": 64}, "batch_size": 2,
           "max_steps": 2, "mixed_precision": "no", "optim": {"lr": 1e-3, "warmup_updates": 0},
           "log": {"every": 1}, "checkpoint": {"save_every": 2},
           "end_to_end": {"codec": str(source), "crop": 64, "decode_crop": 32, "mse": 1.0}}
    train(EndToEndTask, cfg, training_dataset, echo=None)
    assert [r["step"] for r in read_log(tmp_path / "e")] == [1, 2]
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_mini.py"), "end-to-end", str(tmp_path / "e"),
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    before, after = Codec.from_pretrained(source), Codec.from_pretrained(out)
    assert after.sampling == before.sampling and after.sampling["steps"] == 1
    for name in ("effnet", "stage_b", "stage_a"):
        a, b = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        moved = {k for k in a if not torch.equal(a[k].float(), b[k].float())}
        if name == "stage_a":
            assert moved and all(k.startswith(("up_blocks.", "out_block.")) for k in moved), sorted(moved)[:5]
        else:
            assert moved, name
        assert not any("running_" in k for k in moved), name  # BatchNorm statistics frozen
    only = {**cfg, "output_dir": str(tmp_path / "s"), "end_to_end": {**cfg["end_to_end"], "train": ["stage_b"]}}
    train(EndToEndTask, only, training_dataset, echo=None)
    state = load_file(tmp_path / "s/checkpoint/model.safetensors")
    moved = {k.split(".")[0] for k, v in state.items()
             if not torch.equal(v.float(), getattr(before, k.split(".")[0]).state_dict()[k.split(".", 1)[1]].float())}
    assert moved == {"stage_b"}


def test_thumbnail_code_lays_a_luma_and_chroma_thumbnail_on_the_latent_grid():
    """The encoder task's target: BT.601 luma at 3× and chroma at 1× the latent grid, moved into channels."""
    import torch.nn.functional as F

    from codec.training.codec_tasks import thumbnail_code

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    code = thumbnail_code(x, (2, 2), luma=3, chroma=1)
    assert code.shape == (2, 9 + 2, 2, 2)
    y = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    torch.testing.assert_close(F.pixel_shuffle(code[:, :9], 3),
                               F.interpolate(y, size=(6, 6), mode="bicubic", antialias=True), rtol=1e-5, atol=1e-5)
    grey = torch.full((1, 3, 64, 64), 0.3)
    g = thumbnail_code(grey, (2, 2), luma=2, chroma=2)
    assert g.shape == (1, 4 + 8, 2, 2)
    torch.testing.assert_close(g[:, :4], torch.full_like(g[:, :4], 0.3), rtol=0, atol=1e-5)
    torch.testing.assert_close(g[:, 4:], torch.zeros_like(g[:, 4:]), rtol=0, atol=1e-5)  # no colour: Cb = Cr = 0
    assert thumbnail_code(x, (2, 2), luma=2, chroma=0).shape == (2, 4, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the loop calls it with mixed_precision bf16
        assert torch.equal(thumbnail_code(x, (2, 2)), code)


def test_encoder_task_learns_the_thumbnail_code_and_the_codec_task_decodes_it_frozen(tmp_path, images, monkeypatch):
    """`cascade train encoder` lowers its loss and exports an encoder file; `codec` with `codec.encoder` and
    `train_encoder: false` starts from it and leaves it (weights and BatchNorm statistics) as it was, and with
    `t_range: [1, 1]` Stage B is trained only at pure noise (the one step the mini codec's sampler runs)."""
    from codec.diffusion import CosineSchedule, noise_condition
    from codec.training import codec_tasks
    from codec.training.codec_tasks import EncoderTask

    cfg = {"output_dir": str(tmp_path / "enc"), "data": {"images": str(images), "image_size": 64}, "batch_size": 8,
           "max_steps": 30, "mixed_precision": "no", "log": {"every": 1}, "checkpoint": {"save_every": 30},
           "optim": {"lr": 3e-3, "warmup_updates": 0},
           "encoder": {"crop": 64, "encoder_fraction": 1.0, "luma": 2, "chroma": 1}}
    train(EncoderTask, cfg, training_dataset, echo=None)
    loss = [r["loss"] for r in read_log(tmp_path / "enc")]
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5, loss
    encoder = tmp_path / "enc/checkpoint/model.safetensors"
    trained, _ = W.load_configured(EfficientNetEncoder, encoder, None, torch.float32, "cpu")
    assert trained.config == dict(create_model("efficientnet_mini").config)

    too_many = {**cfg, "output_dir": str(tmp_path / "bad"), "encoder": {**cfg["encoder"], "luma": 4}}
    with pytest.raises(Exception, match="need 18 latent channels"):
        train(EncoderTask, too_many, training_dataset, echo=None)

    stage_a = W.save_module(create_model("stage_a_tiny"), tmp_path / "stage_a.safetensors",
                            config=get_preset("stage_a_tiny").kwargs())
    seen = []
    build = codec_tasks.CodecTask.build

    def spy_build(self, dataset):
        module = build(self, dataset)
        forward = module.forward
        module.forward = lambda x, r, **kw: (seen.append(r.detach().clone()), forward(x, r, **kw))[1]
        return module

    monkeypatch.setattr(codec_tasks.CodecTask, "build", spy_build)
    codec_cfg = {"output_dir": str(tmp_path / "c"), "data": {"images": str(images), "image_size": 64},
                 "batch_size": 4, "max_steps": 2, "model": {"preset": "tiny"}, "mixed_precision": "no",
                 "prediction": "v", "t_range": [1, 1], "log": {"every": 1}, "checkpoint": {"save_every": 2},
                 "codec": {"stage_a": str(stage_a), "crop": 64, "encoder": str(encoder), "train_encoder": False}}
    train(CodecTask, codec_cfg, training_dataset, echo=None)
    state = load_file(tmp_path / "c/checkpoint/model.safetensors")
    start = load_file(encoder)
    assert all(torch.equal(state[f"effnet.{k}"], v) for k, v in start.items())  # weights and statistics
    assert any(k.startswith("stage_b.") for k in state)
    r1 = noise_condition(CosineSchedule()(torch.ones(1)))
    assert len(seen) == 2 and all(torch.allclose(r, r1.expand_as(r)) for r in seen)
    with pytest.raises(Exception, match="t_range"):
        train(CodecTask, {**codec_cfg, "output_dir": str(tmp_path / "t"), "t_range": [0.5, 0.2]}, training_dataset,
              echo=None)


def test_random_crops_zoom_shows_more_of_the_image_resized_and_stays_reproducible():
    """`max_zoom`: a window of a fixed side covers up to max_zoom × its side of the image, resized down; the
    default (1) keeps the plain windows of the image's own pixels; the same generators give the same windows."""
    from codec.training.codec_tasks import random_crops
    from codec.training.rng import BatchRandom

    ramp = torch.linspace(0, 1, 128)
    image = torch.stack([ramp[None, :].expand(128, 128)] * 3)[None].repeat(4, 1, 1, 1)  # brightness = column
    plain = random_crops(image, 32, BatchRandom(0, 1, range(4)))
    span = (plain[:, 0, 0, -1] - plain[:, 0, 0, 0]).abs()  # a 32-px window of a 128-px ramp spans 31/127
    torch.testing.assert_close(span, torch.full((4,), 31 / 127))
    zoomed = random_crops(image, 32, BatchRandom(0, 1, range(4)), max_zoom=4.0)
    assert zoomed.shape == (4, 3, 32, 32) and 0 <= float(zoomed.min()) and float(zoomed.max()) <= 1
    wide = (zoomed[:, 0, 0, -1] - zoomed[:, 0, 0, 0]).abs()
    assert float(wide.max()) > 2 * 31 / 127 and float(wide.min()) >= 31 / 127 - 0.02, wide
    torch.testing.assert_close(zoomed, random_crops(image, 32, BatchRandom(0, 1, range(4)), max_zoom=4.0))


def test_end_to_end_task_draws_one_window_side_per_batch_from_crops(tmp_path, images):
    """`crops`: each batch trains on windows of one of the listed sides (Stage B then meets the token counts of
    larger images); a side that is not a multiple of 32 is refused by the config."""
    from codec.training.codec_tasks import EndToEndSection, EndToEndTask
    from codec.training.config import ConfigError

    seen = []

    class Spy(EndToEndTask):
        def latents(self, module, x, rand):
            seen.append(x.shape[-1])
            return super().latents(module, x, rand)

    cfg = {"output_dir": str(tmp_path / "e"), "data": {"images": str(images), "image_size": 128}, "batch_size": 2,
           "max_steps": 8, "mixed_precision": "no", "optim": {"lr": 1e-4, "warmup_updates": 0},
           "log": {"every": 1}, "checkpoint": {"save_every": 8}, "preview": {"every": 0},
           "end_to_end": {"codec": str(ROOT / "codec" / "mini"), "crops": [64, 128], "max_zoom": 2.0,
                          "decode_crop": 32, "mse": 1.0, "train": ["stage_b"]}}
    train(Spy, cfg, training_dataset, echo=None)
    assert set(seen) == {64, 128} and len(seen) == 8, seen
    with pytest.raises((ValueError, ConfigError), match="multiple of 32"):
        EndToEndSection(codec="x", crops=[48])
