"""ControlNet training through the generic loop (`cascade train controlnet`): what trains, the official loss, a few
updates that lower it, the release file it exports, resume, and every control kind."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import fill_

from codec.codec import encode_pixels, load_controlnet
from codec.diffusion import CosineSchedule, noise_condition, p2_loss_weight, vp_scalers
from codec.generation.control_filters import TrainingControl, canny_filter
from codec.generation.training.controlnet_task import (
    ControlledStageC,
    ControlNetTrainingTask,
    controlnet_for,
    resblock_calls,
)
from codec.presets import create_model
from codec.training import train
from codec.training.config import load_config
from codec.training.data import collate
from codec.training.distributed import setup
from codec.training.loop import Trainer
from codec.training.rng import BatchRandom
from datasets_tools.training_data import training_dataset

# a new canny ControlNet that fits the tiny Stage C (10 ResBlock calls); its output projections start at zero
NEW_CANNY = {"kind": "canny", "proj_blocks": [0, 3, 9]}


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


def set_up_trainer(out, files, **over) -> Trainer:
    """The loop for ``cnet_config(out, files, **over)`` with its module built (no update made yet)."""
    cfg, section = load_config(cnet_config(out, files, **over), "controlnet", ControlNetTrainingTask.section_model,
                               "test")
    task = ControlNetTrainingTask(cfg, section, setup("cpu"))
    trainer = Trainer(task, cfg, task.d, training_dataset(task))
    trainer.setup()
    return trainer


def first_batch(trainer: Trainer, n: int = 2) -> dict:
    return collate([trainer.dataset[i] for i in range(n)])


@torch.no_grad()
def official_loss(trainer: Trainer, batch: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample MSE and P2 weight of the official ControlNet loss, written out by hand, for the draws of micro-step 0
    of a run with ``seed`` (order: t, caption and image-embedding dropout, ε, offset noise). Needs no caption or
    image-embedding dropout and Stage C's dropout off (deterministic)."""
    task, module, cfg = trainer.task, trainer.module, trainer.cfg
    assert cfg.conditions.caption_dropout == 0 and cfg.conditions.image_embed_p == 0 and not module.stage_c.training
    images = batch["images"]
    rand = BatchRandom(seed, 0, range(len(images)))
    t = (1 - rand.uniform()).add(0.001).clamp(0.001, 1.0)
    rand.uniform(), rand.uniform()  # the dropout draws
    x0 = encode_pixels(task.effnet, images)
    eps = rand.normal(x0.shape[1:]) + cfg.offset_noise * rand.normal((x0.shape[1], 1, 1))
    logsnr = CosineSchedule()(t)
    a, b = (s.view(-1, 1, 1, 1) for s in vp_scalers(logsnr))
    text = task.text.encoder.encode(batch["caption"])
    clip_img = torch.zeros(len(images), 1, module.stage_c.config.c_clip_img)
    cnet = module.controlnet(canny_filter(images))
    pred = module.stage_c(a * x0 + b * eps, noise_condition(logsnr), text.hidden, text.pooled, clip_img, cnet=cnet)
    return ((pred - eps) ** 2).mean(dim=[1, 2, 3]), p2_loss_weight(logsnr)


def test_controlnet_for_sizes_to_stage_c():
    with torch.device("meta"):
        large = create_model("stage_c_large")
        lite = create_model("stage_c_lite")
    assert resblock_calls(large) == 64 and resblock_calls(lite) == 32
    assert resblock_calls(create_model("stage_c_tiny")) == 10
    with torch.device("meta"):
        net = controlnet_for(large, "canny")
        assert net.config["c_proj"] == 2048 and net.proj_blocks == [0, 4, 8, 12, 51, 55, 59, 63]
        with pytest.raises(ValueError, match="32 ResBlock calls"):
            controlnet_for(lite, "canny")
        assert controlnet_for(lite, "canny", proj_blocks=[0, 31]).config["c_proj"] == 1536


def test_only_the_controlnet_trains(tmp_path, cnet_run_files):
    """A new canny ControlNet in the loop: only ``controlnet.*`` trains, in the official modes; on the first
    update only the zero-initialised output projections get a gradient, and Stage C's weights do not move."""
    trainer = set_up_trainer(tmp_path, cnet_run_files, controlnet=NEW_CANNY)
    module = trainer.module
    stage_c, controlnet = module.stage_c, module.controlnet
    assert isinstance(module, ControlledStageC) and isinstance(trainer.task.control, TrainingControl)
    assert trainer.cfg.offset_noise == 0.0  # canny's official value
    # official modes: Stage C frozen but in train mode (dropout on), ControlNet BN frozen
    assert stage_c.training and not any(p.requires_grad for p in stage_c.parameters())
    assert controlnet.projections.training and not controlnet.backbone.training
    assert {id(p) for p in trainer.params} == {id(p) for p in controlnet.parameters()}
    assert trainer.trainable_names and all(n.startswith("controlnet.") for n in trainer.trainable_names)
    # modes survive eval()/train() (previews switch to eval and back)
    module.eval()
    assert not stage_c.training and not controlnet.training
    module.train()
    assert stage_c.training and controlnet.projections.training and not controlnet.backbone.training
    stage_c_before = {k: v.clone() for k, v in stage_c.state_dict().items()}
    cnet_before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    trainer._micro_step(first_batch(trainer), sync=True)
    assert all(p.grad is None for p in stage_c.parameters())
    assert all(proj[-1].weight.grad.abs().max() > 0 for proj in controlnet.projections)
    assert controlnet.backbone[0][0].weight.grad.abs().max() == 0
    for group in trainer.optim.param_groups:  # past the warm-up update (lr 0)
        group["lr"] = 1e-3
    trainer._update()
    assert all(torch.equal(v, stage_c.state_dict()[k]) for k, v in stage_c_before.items())
    assert not all(torch.equal(v, controlnet.state_dict()[k]) for k, v in cnet_before.items())


def test_loss_is_the_official_recipe(tmp_path, cnet_run_files):
    """The loop's per-sample losses for a ControlNet batch equal the official loss written out by hand from the
    same random draws: offset noise, P2 weights, Stage C fed ``cnet = controlnet(canny(images))``."""
    start = cnet_config(tmp_path, cnet_run_files)["controlnet"]  # non-zero projections: the control matters
    trainer = set_up_trainer(tmp_path, cnet_run_files, offset_noise=0.1,
                             conditions={"caption_dropout": 0.0, "image_embed_p": 0.0},
                             controlnet={**start, "stage_c_dropout": False})
    batch = first_batch(trainer)
    per_sample, weight = official_loss(trainer, batch, trainer.cfg.seed)
    losses, weighted = trainer._micro_step(batch, sync=True)
    torch.testing.assert_close(losses, per_sample)
    torch.testing.assert_close(weighted, per_sample * weight)


@pytest.mark.slow
def test_a_few_updates_lower_the_loss(tmp_path, cnet_run_files):
    """A new ControlNet (a no-op at first: the loss is Stage C's alone) learns to help within ten updates of the
    loop: a held-out loss (fixed t and noise that training never draws) falls."""
    trainer = set_up_trainer(tmp_path, cnet_run_files, max_steps=10, batch_size=4,
                             optim={"lr": 2e-3, "warmup_updates": 0}, checkpoint={"save_every": 10},
                             conditions={"caption_dropout": 0.0, "image_embed_p": 0.0},
                             controlnet={**NEW_CANNY, "stage_c_dropout": False})
    batch = first_batch(trainer, 4)

    def held_out() -> float:
        per_sample, weight = official_loss(trainer, batch, seed=999)
        return float((per_sample * weight).mean())

    before = held_out()
    trainer.run()  # builds the module again from the same files and seed, so it starts from the weights above
    after = held_out()
    assert after < 0.8 * before, f"loss {before:.4f} -> {after:.4f}"


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


def test_exported_controlnet_is_the_release_file(tmp_path, cnet_run_files):
    """What the loop saves (a checkpoint's model.safetensors, the exported file) is the whole ControlNet with its
    config, BatchNorm statistics included: it loads with load_controlnet, and back into the loop."""
    trainer = set_up_trainer(tmp_path, cnet_run_files, controlnet=NEW_CANNY)
    controlnet, task = trainer.module.controlnet, trainer.task
    path = tmp_path / "controlnet.safetensors"
    task.export(trainer.trainable_state(), path)
    loaded = load_controlnet(path, "canny", device="cpu")
    assert loaded.config == controlnet.config
    assert list(loaded.state_dict()) == list(controlnet.state_dict())
    for (k, a), b in zip(controlnet.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    back = task.import_(path)
    assert sorted(back) == sorted(trainer.trainable_names)


@pytest.mark.slow
def test_cli_trains_only_the_controlnet_and_exports_the_release_file(tmp_path, cnet_run_files):
    import yaml
    from click.testing import CliRunner

    from codec.cli import main
    from codec.training.logs import read_log

    _, start, _ = cnet_run_files
    path = tmp_path / "cnet.yaml"
    path.write_text(yaml.safe_dump(cnet_config(tmp_path / "out", cnet_run_files)))
    result = CliRunner().invoke(main, ["train", "controlnet", str(path)])
    assert result.exit_code == 0, result.output
    assert "done: 3 updates" in result.output
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in log)
    before = load_controlnet(start, "canny", device="cpu").state_dict()
    trained = load_controlnet(tmp_path / "out/checkpoint/model.safetensors", "canny", device="cpu")
    after = trained.state_dict()
    assert list(after) == list(before)  # the released key order, BatchNorm buffers included
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("projections.") for k in changed) and any(k.startswith("backbone.") for k in changed)
    # BatchNorm statistics stay frozen (official: backbone in eval mode)
    assert not any("running_" in k or "num_batches" in k for k in changed)


def test_inpainting_defaults_to_the_official_offset_noise(cnet_run_files):
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

    class Kill(Exception):
        pass

    def kill(step):
        if step == 3:
            raise Kill

    over = {"max_steps": 4, "conditions": {"caption_dropout": 0.5, "image_embed_p": 0.5}}
    train(ControlNetTrainingTask, cnet_config(tmp_path / "a", cnet_run_files, **over), training_dataset, echo=None)
    with pytest.raises(Kill):
        train(ControlNetTrainingTask, cnet_config(tmp_path / "b", cnet_run_files, **over), training_dataset,
              hook=kill, echo=None)
    train(ControlNetTrainingTask, cnet_config(tmp_path / "b", cnet_run_files, **over), training_dataset, echo=None)
    a, b = (load_file(tmp_path / run / "checkpoint/model.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_exported_controlnet_drives_the_pipeline(tmp_path, cnet_run_files):
    """The trained file, placed as controlnet/canny.safetensors in a weights folder, steers generation."""
    import shutil

    from codec.generation.pipeline import TextToImage

    weights, _, images = cnet_run_files
    train(ControlNetTrainingTask, cnet_config(tmp_path / "run", cnet_run_files, max_steps=2), training_dataset,
          echo=None)
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

    from codec import weights as W
    from codec.generation import control_filters as CF
    from codec.tiny import write_tiny_controlnet
    from codec.training.logs import read_log

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
    train(ControlNetTrainingTask, cfg, training_dataset, echo=None)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    skipped = (tmp_path / "run" / "skipped.jsonl").read_text()
    assert "img1b.png" in skipped and "img2b.jpg" in skipped
    before = load_controlnet(start, kind, device="cpu").state_dict()
    after = load_controlnet(tmp_path / "run/checkpoint/model.safetensors", kind, device="cpu").state_dict()
    assert list(after) == list(before) and any(not torch.equal(before[k], after[k]) for k in before)
