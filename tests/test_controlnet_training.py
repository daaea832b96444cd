"""ControlNet training task: what trains, the official loss, and a few optimisation steps that lower it."""

from __future__ import annotations

import math

import pytest
import torch

from codec.effnet import EfficientNetEncoder
from codec.generation.control_filters import TrainingControl, canny_filter
from codec.generation.controlnet import ControlNet
from codec.generation.controlnet_training import ControlNetTask, controlnet_for, resblock_calls
from codec.generation.stage_c import StageC
from codec.tiny import TINY_STAGE_C

from helpers import fill_


def blocky_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="nearest")


@pytest.fixture(scope="module")
def effnet() -> EfficientNetEncoder:
    return fill_(EfficientNetEncoder(), 0).eval().requires_grad_(False)


@pytest.fixture()
def stage_c_and_batch():
    torch.manual_seed(0)
    stage_c = fill_(StageC(**TINY_STAGE_C), 0)
    g = torch.Generator().manual_seed(1)
    batch = {"images": blocky_images(2),
             "latents": torch.randn(2, 16, 4, 4, generator=g),
             "clip_text": torch.randn(2, 77, TINY_STAGE_C["c_clip_text"], generator=g),
             "clip_text_pooled": torch.randn(2, 1, TINY_STAGE_C["c_clip_text_pooled"], generator=g)}
    return stage_c, batch


@pytest.fixture()
def setup(stage_c_and_batch, effnet):
    stage_c, batch = stage_c_and_batch
    controlnet = controlnet_for(stage_c, "canny", proj_blocks=[0, 3, 9])
    controlnet.init_backbone(effnet.state_dict())
    return stage_c, controlnet, effnet, batch


def test_controlnet_for_sizes_to_stage_c():
    with torch.device("meta"):
        large = StageC.from_preset("stage_c_large")
        lite = StageC.from_preset("stage_c_lite")
    assert resblock_calls(large) == 64 and resblock_calls(lite) == 32
    assert resblock_calls(StageC(**TINY_STAGE_C)) == 10
    with torch.device("meta"):
        net = controlnet_for(large, "canny")
        assert net.config["c_proj"] == 2048 and net.proj_blocks == [0, 4, 8, 12, 51, 55, 59, 63]
        with pytest.raises(ValueError, match="32 ResBlock calls"):
            controlnet_for(lite, "canny")
        assert controlnet_for(lite, "canny", proj_blocks=[0, 31]).config["c_proj"] == 1536


def test_only_the_controlnet_trains(setup):
    stage_c, controlnet, effnet, batch = setup
    task = ControlNetTask.for_kind("canny", stage_c, controlnet, effnet=effnet)
    assert task.offset_noise == 0.0 and isinstance(task.control, TrainingControl)
    # official modes: Stage C frozen but in train mode (dropout on), ControlNet BN frozen
    assert stage_c.training and not any(p.requires_grad for p in stage_c.parameters())
    assert controlnet.projections.training and not controlnet.backbone.training
    assert {id(p) for p in task.parameters()} == {id(p) for p in controlnet.parameters()}
    # the module a generic loop trains: trainable names are the ControlNet's, modes survive eval()/train()
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("controlnet.") for n in trainable)
    task.model.eval()
    assert not stage_c.training and not controlnet.training
    task.model.train()
    assert stage_c.training and controlnet.projections.training and not controlnet.backbone.training
    task.loss(batch, torch.Generator().manual_seed(0)).loss.backward()
    assert all(p.grad is None for p in stage_c.parameters())
    # zero-initialised output projections: only they get a gradient on the first step
    assert all(p.grad is not None and p.grad.abs().max() > 0 for proj in controlnet.projections for p in [proj[-1].weight])
    assert controlnet.backbone[0][0].weight.grad.abs().max() == 0


def test_loss_is_the_official_recipe(setup):
    """Rebuild the loss by hand from the same random draws (official order: filter, t, ε, offset)."""
    stage_c, controlnet, effnet, batch = setup
    task = ControlNetTask(stage_c, controlnet, lambda x, g: canny_filter(x), offset_noise=0.1, stage_c_dropout=False)
    with torch.no_grad():
        controlnet.projections[0][-1].weight.normal_(std=0.05)
        got = task.loss(batch, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        t = (1 - torch.rand(2, generator=g)).add(0.001).clamp(0.001, 1.0)
        eps = torch.randn(2, 16, 4, 4, generator=g) + 0.1 * torch.randn(2, 16, 1, 1, generator=g)
        from codec.diffusion import CosineSchedule, noise_condition, p2_loss_weight, vp_scalers

        logsnr = CosineSchedule()(t)
        a, b = (s.view(-1, 1, 1, 1) for s in vp_scalers(logsnr))
        x0 = batch["latents"]
        pred = stage_c(a * x0 + b * eps, noise_condition(logsnr), batch["clip_text"], batch["clip_text_pooled"],
                       torch.zeros(2, 1, TINY_STAGE_C["c_clip_img"]), cnet=controlnet(canny_filter(batch["images"])))
        per_sample = ((pred - eps) ** 2).mean(dim=[1, 2, 3])
    torch.testing.assert_close(got.per_sample, per_sample)
    torch.testing.assert_close(got.loss, (per_sample * p2_loss_weight(logsnr)).mean())


def test_a_few_steps_lower_the_loss(stage_c_and_batch):
    """A small 'simple' ControlNet reading the image at latent resolution (cheap on a CPU) learns to help."""
    stage_c, batch = stage_c_and_batch
    controlnet = ControlNet(c_in=3, c_proj=TINY_STAGE_C["c_hidden"][0], proj_blocks=[0, 3, 9],
                            bottleneck_mode="simple")
    task = ControlNetTask(stage_c, controlnet, lambda x, g: torch.nn.functional.adaptive_avg_pool2d(x, (4, 4)))
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)

    def held_out_loss() -> float:
        # the same t, noise and dropout every time, none of them seen in training
        torch.manual_seed(123)
        with torch.no_grad():
            return task.loss(batch, torch.Generator().manual_seed(999)).loss.item()

    before = held_out_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        task.loss(batch, g).loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        optimizer.step()
    after = held_out_loss()
    assert after < 0.8 * before, f"loss {before:.4f} -> {after:.4f}"
    assert all(p.grad is None for p in stage_c.parameters())


def test_grn_gradient_is_finite_for_a_zero_channel():
    """Training needs GRN's gradient where a channel is all zero (sqrt'(0) = inf would give NaN)."""
    from codec.blocks import GlobalResponseNorm

    grn = GlobalResponseNorm(4)
    with torch.no_grad():
        grn.gamma.fill_(0.5)
    x = torch.randn(1, 3, 3, 4)
    x[..., 1] = 0
    x.requires_grad_(True)
    grn(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_saved_controlnet_loads_back(setup, tmp_path):
    stage_c, controlnet, effnet, _ = setup
    task = ControlNetTask.for_kind("canny", stage_c, controlnet, effnet=effnet)
    assert set(task.models_to_save()) == {"controlnet"}
    path = task.save(tmp_path / "controlnet.safetensors")
    loaded = ControlNet.from_pretrained(path, "canny", device="cpu")
    assert loaded.config == controlnet.config
    for (k, a), b in zip(controlnet.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------ `cascade train controlnet` (the generic loop)


def cnet_config(out, files, **over):
    from codec import weights as W

    weights, start, images = files
    # the tiny weights' Stage C (random, non-zero output layer: a fresh one's zero-initialised output passes
    # no gradient to the ControlNet)
    stage_c = weights / W.STAGE_C_FILES["lite"]["fp32"]
    cfg = {"output_dir": str(out), "weights": str(weights), "data": {"images": str(images), "image_size": 64},
           "batch_size": 2, "max_steps": 3, "model": {"checkpoint": str(stage_c)}, "log": {"every": 1},
           "optim": {"lr": 1e-3}, "checkpoint": {"save_every": 2},
           "controlnet": {"kind": "canny", "checkpoint": str(start)}}
    cfg.update(over)
    return cfg


@pytest.mark.slow
def test_cli_trains_only_the_controlnet_and_exports_the_release_file(tmp_path, cnet_run_files):
    import yaml
    from click.testing import CliRunner

    from codec.cli import main
    from codec.generation.finetune.logs import read_log

    _, start, _ = cnet_run_files
    path = tmp_path / "cnet.yaml"
    path.write_text(yaml.safe_dump(cnet_config(tmp_path / "out", cnet_run_files)))
    result = CliRunner().invoke(main, ["train", "controlnet", str(path)])
    assert result.exit_code == 0, result.output
    assert "done: 3 updates" in result.output
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in log)
    before = ControlNet.from_pretrained(start, "canny", device="cpu").state_dict()
    trained = ControlNet.from_pretrained(tmp_path / "out/checkpoint/model.safetensors", "canny", device="cpu")
    after = trained.state_dict()
    assert list(after) == list(before)  # the released key order, BatchNorm buffers included
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("projections.") for k in changed) and any(k.startswith("backbone.") for k in changed)
    # BatchNorm statistics stay frozen (official: backbone in eval mode)
    assert not any("running_" in k or "num_batches" in k for k in changed)


def test_stage_c_is_untouched(cnet_run_files, tmp_path):
    """The loop's module: only controlnet.* trains, and Stage C's weights are the same after updates."""
    from codec.generation.finetune.config import load_config
    from codec.generation.finetune.controlnet_task import ControlNetTrainingTask
    from codec.generation.finetune.distributed import setup
    from codec.generation.finetune.loop import Trainer

    # the image dataset writes skipped.jsonl into output_dir: a temporary folder, not the working directory
    cfg, section = load_config(cnet_config(tmp_path / "run", cnet_run_files), "controlnet",
                               ControlNetTrainingTask.section_model, "test")
    assert cfg.offset_noise == 0.0
    task = ControlNetTrainingTask(cfg, section, setup("cpu"))
    trainer = Trainer(task, cfg, task.d, task.dataset())
    trainer.setup()
    assert all(n.startswith("controlnet.") for n in trainer.trainable_names)
    stage_c = {k: v.clone() for k, v in trainer.module.stage_c.state_dict().items()}
    cnet = {k: v.clone() for k, v in trainer.module.controlnet.state_dict().items()}
    for group in trainer.optim.param_groups:  # past the warm-up update (lr 0)
        group["lr"] = 1e-3
    from codec.generation.finetune.data import collate

    batch = collate([trainer.dataset[i] for i in range(2)])
    trainer._micro_step(batch, sync=True)
    trainer._update()
    assert all(torch.equal(v, trainer.module.stage_c.state_dict()[k]) for k, v in stage_c.items())
    assert not all(torch.equal(v, trainer.module.controlnet.state_dict()[k]) for k, v in cnet.items())


def test_inpainting_defaults_to_the_official_offset_noise(cnet_run_files):
    from codec.generation.finetune.config import load_config
    from codec.generation.finetune.controlnet_task import ControlNetTrainingTask
    from codec.generation.finetune.distributed import setup

    data = cnet_config("unused", cnet_run_files, controlnet={"kind": "inpainting"})
    cfg, section = load_config(data, "controlnet", ControlNetTrainingTask.section_model, "test")
    ControlNetTrainingTask(cfg, section, setup("cpu"))
    assert cfg.offset_noise == 0.1
    cfg, section = load_config({**data, "offset_noise": 0.0}, "controlnet", ControlNetTrainingTask.section_model, "t")
    ControlNetTrainingTask(cfg, section, setup("cpu"))
    assert cfg.offset_noise == 0.0


@pytest.mark.slow
def test_controlnet_run_resumes_bit_identically(tmp_path, cnet_run_files):
    from safetensors.torch import load_file

    from codec.generation.finetune import train

    class Kill(Exception):
        pass

    def kill(step):
        if step == 3:
            raise Kill

    over = {"max_steps": 4, "conditions": {"caption_dropout": 0.5, "image_embed_p": 0.5}}
    train("controlnet", cnet_config(tmp_path / "a", cnet_run_files, **over), echo=None)
    with pytest.raises(Kill):
        train("controlnet", cnet_config(tmp_path / "b", cnet_run_files, **over), hook=kill, echo=None)
    train("controlnet", cnet_config(tmp_path / "b", cnet_run_files, **over), echo=None)
    a, b = (load_file(tmp_path / run / "checkpoint/model.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_exported_controlnet_drives_the_pipeline(tmp_path, cnet_run_files):
    """The trained file, placed as controlnet/canny.safetensors in a weights folder, steers generation."""
    import shutil

    from codec.generation.finetune import train
    from codec.generation.pipeline import TextToImage

    weights, _, images = cnet_run_files
    train("controlnet", cnet_config(tmp_path / "run", cnet_run_files, max_steps=2), echo=None)
    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    (folder / "controlnet").mkdir(exist_ok=True)
    shutil.copy(tmp_path / "run/checkpoint/model.safetensors", folder / "controlnet/canny.safetensors")
    pipe = TextToImage.from_pretrained(folder, device="cpu")
    kw = dict(height=256, width=256, steps_c=2, steps_b=2, seed=0, output="pt")
    plain = pipe.generate("shapes", **kw).images
    steered = pipe.generate("shapes", controlnet="canny", control_image=images / "img0.png", **kw).images
    assert plain.shape == steered.shape and torch.isfinite(steered).all()
    assert not torch.equal(plain, steered)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["inpainting", "super_resolution"])
def test_every_kind_trains_through_the_loop_past_unreadable_images(tmp_path, cnet_run_files, kind):
    """Inpainting (mask filter, saliency route for half the samples) and super-resolution (low-resolution latent)
    train a few updates with the release layout as output; a corrupt and an empty file in data.images are
    skipped and recorded, not fatal."""
    import shutil

    from codec.generation.finetune import train
    from codec.generation.finetune.logs import read_log
    from codec.tiny import write_tiny_controlnet

    from codec import weights as W
    from codec.generation import control_filters as CF

    base, _, images = cnet_run_files
    weights = tmp_path / "weights"
    shutil.copytree(base, weights)
    if kind == "inpainting":  # the training filter's saliency route (random weights)
        W.save_module(fill_(CF.SaliencyNet(), 0).eval(), weights / CF.SALIENCY_FILE)
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    (folder / "img1b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "img2b.jpg").write_bytes(b"")
    start = write_tiny_controlnet(tmp_path / "start", kind)
    cfg = cnet_config(tmp_path / "run", (weights, start, folder), max_steps=2,
                      controlnet={"kind": kind, "checkpoint": str(start)})
    train("controlnet", cfg, echo=None)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    skipped = (tmp_path / "run" / "skipped.jsonl").read_text()
    assert "img1b.png" in skipped and "img2b.jpg" in skipped
    before = ControlNet.from_pretrained(start, kind, device="cpu").state_dict()
    after = ControlNet.from_pretrained(tmp_path / "run/checkpoint/model.safetensors", kind, device="cpu").state_dict()
    assert list(after) == list(before) and any(not torch.equal(before[k], after[k]) for k in before)
