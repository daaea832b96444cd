"""ControlNet loading, control inputs for inference and the ``cnet`` list handed to Stage C (tiny weights)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from codec import weights as W
from codec.effnet import EfficientNetEncoder
from codec.images import to_tensor_list
from codec.generation import control_filters as CF
from codec.controlnet import CONTROLNET_FILES, ControlNet
from codec.generation.control import control_features
from codec.tiny import write_tiny_controlnet

from helpers import fill_
from codec.codec import load_controlnet
from codec.presets import create_model, get_preset


def shapes_image(height: int = 120, width: int = 160) -> Image.Image:
    img = Image.new("RGB", (width, height), (40, 60, 90))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 5, height // 5, width // 2, height // 2], fill=(230, 200, 30))
    draw.ellipse([width // 2, height // 3, width - 10, height - 10], fill=(200, 30, 60))
    return img


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cnet_weights")
    for kind in ("canny", "inpainting", "super_resolution"):
        write_tiny_controlnet(folder, kind)
    return folder


@pytest.fixture(scope="module")
def canny(weights_dir) -> ControlNet:
    return load_controlnet(weights_dir, "canny", device="cpu")


@pytest.fixture(scope="module")
def effnet() -> EfficientNetEncoder:
    return fill_(EfficientNetEncoder(), 0).eval()


# ------------------------------------------------------------------------------------------ loading


def test_from_pretrained_folder_and_file(weights_dir, canny):
    assert canny.kind == "canny" and canny.config == get_preset("controlnet_canny_tiny").kwargs()
    assert not canny.training and not any(p.requires_grad for p in canny.parameters())
    by_file = load_controlnet(weights_dir / CONTROLNET_FILES["canny"], device="cpu", dtype="fp32")
    assert by_file.kind == "canny"
    for (k, a), b in zip(canny.state_dict().items(), by_file.state_dict().values()):
        assert torch.equal(a, b), k
    bf16 = load_controlnet(weights_dir, "canny", device="cpu", dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_official_layout_file_uses_the_official_preset(tmp_path):
    """A file without our config metadata (like the released ones) is read as the official preset."""
    model = create_model("controlnet_canny_tiny")
    W.save_module(model, tmp_path / CONTROLNET_FILES["canny"])  # no config in the metadata
    with pytest.raises(W.WeightsError, match=r"wrong shape[\s\S]*projections\.0\.2\.weight: file \[64, 1280, 1, 1\], "
                                             r"model \[2048, 1280, 1, 1\]"):
        load_controlnet(tmp_path, "canny", device="cpu")
    W.save_module(model, tmp_path / "mine.safetensors")
    with pytest.raises(W.WeightsError, match="does not say which ControlNet"):
        load_controlnet(tmp_path / "mine.safetensors", device="cpu")


def test_missing_or_unreleased_files_are_explained(tmp_path):
    with pytest.raises(W.WeightsError, match=r"missing controlnet/canny\.safetensors"):
        load_controlnet(tmp_path, "canny", device="cpu")
    with pytest.raises(W.WeightsError, match="no released file"):
        load_controlnet(tmp_path, "identity", device="cpu")


def test_backbone_stays_in_eval_mode_when_training():
    model = create_model("controlnet_canny_tiny").train()
    assert model.training and model.projections.training
    assert not any(m.training for m in model.backbone.modules())
    simple = create_model("controlnet_super_resolution_tiny").train()
    assert simple.backbone.training


@pytest.mark.parametrize("c_in", [1, 4])
def test_init_backbone_adapts_the_stem(effnet, c_in):
    model = ControlNet(c_in=c_in, c_proj=8, proj_blocks=[0])
    model.init_backbone(effnet.state_dict())
    rgb = effnet.backbone[0][0].weight
    stem = model.backbone[0][0].weight
    assert stem.shape == (24, c_in, 3, 3)
    assert torch.equal(stem[:, :min(c_in, 3)], rgb[:, :min(c_in, 3)])
    if c_in > 3:
        assert stem[:, 3:].abs().max() == 0
    assert torch.equal(model.backbone[7][0].weight, effnet.backbone[7][0].weight)


# ------------------------------------------------------------------------------------------ control inputs


def test_fit_keeps_aspect_and_centre():
    x = torch.zeros(1, 1, 100, 200)
    x[..., 50:, :] = 1.0  # bottom half white
    x[..., :40] = 0.5  # a stripe on the left that the centre crop removes
    out = CF.fit(x, (40, 40))  # resized to 40×80, then columns 20–60 kept
    assert out.shape == (1, 1, 40, 40)
    assert out[..., :18, :].max() == 0 and out[..., 22:, :].min() > 0.999


def test_canny_features_shape_strength_and_batch(canny):
    image = shapes_image()
    control = CF.control_input("canny", image, size=(256, 320))
    # the control image is fitted to the encoder's input size for a 256×320 output: 192×224
    assert control.input.shape == (1, 1, 192, 224) and control.preview.shape == (1, 3, 192, 224)
    assert 0.005 < control.input.gt(0).float().mean() < 0.3
    full = control_features(canny, image, "canny", size=(256, 320), batch_size=2)
    half = control_features(canny, image, strength=0.5, size=(256, 320))
    assert len(full) == 10 and [i for i, c in enumerate(full) if c is not None] == [0, 3, 9]
    assert full[0].shape == (2, 64, 6, 7)
    torch.testing.assert_close(half[3][0], full[3][0] * 0.5)
    assert full[9].abs().max() > 0


def test_inpainting_with_a_user_mask():
    image = torch.rand(1, 3, 64, 96)
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 47, 63], fill=255)  # left half: fill
    control = CF.control_input("inpainting", image, mask=mask)
    x = control.input
    assert x.shape == (1, 4, 32, 64)  # encoder size for 64×96: floor(48/32)·32 × floor(72/32)·32 → 32×64
    assert x[:, 3, :, :30].min() == 1 and x[:, 3, :, 34:].max() == 0
    assert x[:, :3, :, :30].min() == 1  # painted white
    assert torch.equal(x[:, :3], control.preview)


def test_inpainting_with_the_saliency_route(tmp_path):
    saliency = fill_(CF.SaliencyNet(), 0).eval()
    W.save_module(saliency, tmp_path / CF.SALIENCY_FILE)
    loaded = CF.load_saliency(tmp_path)
    image = shapes_image(256, 256)
    # a random net's saliencies sit in a narrow band: threshold at their median to get a real mask
    with torch.no_grad():
        threshold = loaded(torch.stack(to_tensor_list(image))).median().item()
    inside = CF.control_input("inpainting", image, saliency=loaded, threshold=threshold).input[:, 3]
    outside = CF.control_input("inpainting", image, saliency=loaded, threshold=threshold, outpaint=True).input[:, 3]
    assert 0.05 < inside.mean() < 0.95
    # outpainting fills (about) the complement; only pixels on the blurred border may agree
    assert (inside == outside).float().mean() < 0.1


def test_missing_saliency_and_mask_are_explained(tmp_path):
    with pytest.raises(W.WeightsError, match="saliency_model.pt"):
        CF.load_saliency(tmp_path)
    with pytest.raises(ValueError, match="mask"):
        CF.control_input("inpainting", torch.rand(1, 3, 64, 64))


def test_super_resolution_features(weights_dir, effnet):
    sr = load_controlnet(weights_dir, "super_resolution", device="cpu")
    image = torch.rand(1, 3, 256, 192)
    cnet = control_features(sr, image, effnet=effnet)
    # default output 512×384: the encoder sees the image at 192×128 → 6×4 latent → 12×8 after 2× upsampling
    assert cnet[0].shape == (1, 64, 12, 8)
    with pytest.raises(ValueError, match="EfficientNet"):
        control_features(sr, image)


def test_unknown_kind_is_explained(canny):
    with pytest.raises(ValueError, match="unknown control kind 'depth'"):
        control_features(canny, torch.rand(1, 3, 64, 64), "depth")


class RampSaliency(torch.nn.Module):
    """Saliency rising from 0 (left) to 0.5 (right): the mask fraction reveals the threshold drawn."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linspace(0, 0.5, x.shape[-1]).expand(x.size(0), 1, x.shape[-2], -1)


def test_training_control_draws_are_official_and_reproducible():
    control = CF.TrainingControl("inpainting", saliency=RampSaliency())
    images = torch.rand(1, 3, 128, 128)

    def masks(seed: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([control(images, g)[:, 3] for _ in range(n)])

    first = masks(0, 24)
    assert torch.equal(first[:4], masks(0, 4))  # same generator seed, same thresholds and outpaint draws
    # the ramp is salient on the right: inpainting fills a right part, outpainting (p = 0.4) a left part,
    # and the threshold ~U(0.04, 0.4) sets how much (about 1 - 2·threshold of the width)
    left, right = first[:, :, 0].mean(dim=1) > 0.5, first[:, :, -1].mean(dim=1) > 0.5
    assert (right & ~left).sum() > 5 and (left & ~right).sum() > 2
    assert len(set(first.mean(dim=(1, 2)).tolist())) > 6
    with pytest.raises(ValueError, match="saliency"):
        CF.TrainingControl("inpainting")
    edges = CF.TrainingControl("canny")(torch.stack(to_tensor_list(shapes_image(128, 128))))
    assert edges.shape == (1, 1, 128, 128) and edges.max() > 0


def test_cnet_goes_through_the_sampler_with_cfg(canny):
    """The documented wiring: the same ``cnet`` list in the conditional and unconditional inputs."""
    from codec.diffusion import sample

    stage_c = fill_(create_model("stage_c_tiny"), 0).eval()
    g = torch.Generator().manual_seed(0)
    cond = {"clip_text": torch.randn(2, 77, 24, generator=g), "clip_text_pooled": torch.randn(2, 1, 24, generator=g),
            "clip_img": torch.zeros(2, 1, 16)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    cnet = control_features(canny, shapes_image(), size=(256, 256), batch_size=2)
    assert cnet[0].shape == (2, 64, 6, 6)

    def run(extra: dict) -> torch.Tensor:
        return sample(stage_c, {**cond, **extra}, shape=(2, 16, 6, 6), uncond={**uncond, **extra}, steps=3, cfg=4.0,
                      shift=2.0, generator=torch.Generator().manual_seed(1))

    with_control, zero_strength = run({"cnet": cnet}), run({"cnet": [None if c is None else c * 0 for c in cnet]})
    torch.testing.assert_close(zero_strength, run({}), rtol=0, atol=0)
    assert (with_control - zero_strength).abs().max() > 1e-2 * zero_strength.abs().max()
