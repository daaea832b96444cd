"""ControlNet and control filters against golden outputs of the official code (``golden_controlnet``) and the
official state-dict layouts (``controlnet_official_keys.json.gz``); see ``tests/data/README.md``."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from codec.effnet import EfficientNetEncoder
from codec.generation import control_filters as CF
from codec.controlnet import ControlNet
from codec.generation.control import scale_features
from codec.stage_c import StageC

from helpers import DATA_DIR, TINY_STAGE_C_CONFIG, assert_close_scaled, bn1_, fill_, load_golden, sub_dict
from codec.presets import create_model, get_preset

RTOL = 1e-4
OFFICIAL = json.loads(gzip.decompress((DATA_DIR / "controlnet_official_keys.json.gz").read_bytes()))
# official.md §15 item 1
N_PARAMS = {"canny": 54_255_776, "inpainting": 54_256_424, "super_resolution": 203_491_584,
            "identity": 102_763_008}
N_TENSORS = {"canny": 796, "super_resolution": 86, "identity": 132}


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_golden("golden_controlnet")


def _features(golden: dict[str, torch.Tensor], prefix: str, length: int) -> list[torch.Tensor | None]:
    return [golden.get(f"{prefix}.{i}") for i in range(length)]


def _assert_features(out: list, ref: list, name: str) -> None:
    assert len(out) == len(ref), f"{name}: {len(out)} entries, official {len(ref)}"
    for i, (o, r) in enumerate(zip(out, ref)):
        assert (o is None) == (r is None), f"{name}[{i}]: None-ness differs"
        if r is not None:
            assert_close_scaled(o, r, RTOL, name=f"{name}[{i}]")


def _filled(model: torch.nn.Module, bn1: bool = True) -> torch.nn.Module:
    fill_(model, 0)
    if bn1:
        assert bn1_(model) > 0
    return model.eval()


# ------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("kind", list(N_PARAMS))
def test_state_dict_matches_official_on_meta(kind):
    with torch.device("meta"):
        model = create_model(f"controlnet_{kind}")
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == OFFICIAL[kind]["keys"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == OFFICIAL[kind]["n_params"] == N_PARAMS[kind]
    if kind in N_TENSORS:
        assert len(ours) == N_TENSORS[kind]


def test_presets_are_the_official_configs():
    assert get_preset("controlnet_canny").config.proj_blocks == [0, 4, 8, 12, 51, 55, 59, 63]
    with torch.device("meta"):
        canny = create_model("controlnet_canny")
        rgb = ControlNet(c_in=3)
    # the stem quirk: a 1-channel stem has no padding, the RGB one keeps torchvision's padding 1
    assert canny.backbone[0][0].padding == (0, 0) and canny.backbone[0][0].bias is None
    assert rgb.backbone[0][0].padding == (1, 1)
    assert len(canny(torch.empty(1, 1, 64, 64, device="meta"))) == 64


def test_saliency_state_dict_matches_official():
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in CF.SaliencyNet().state_dict().items()]
    assert ours == OFFICIAL["saliency"]["keys"]


# ------------------------------------------------------------------------------------------ filters


def test_canny_filter(golden):
    edges = CF.canny_filter(golden["canny.image"])
    assert edges.shape == (2, 1, 96, 80)
    assert golden["canny.edges"].gt(0).float().mean() > 0.02  # the golden image does have edges
    assert_close_scaled(edges, golden["canny.edges"], RTOL, name="canny.edges")


def test_saliency_net(golden):
    model = _filled(CF.SaliencyNet(), bn1=False)
    with torch.no_grad():
        out = model(golden["saliency.x"])
    assert_close_scaled(out, golden["saliency.out"], RTOL, name="saliency")


@pytest.mark.parametrize("outpaint,key", [(False, "inpaint.in"), (True, "inpaint.out_in")])
def test_inpaint_filter_saliency_route(golden, outpaint, key):
    saliency = _filled(CF.SaliencyNet(), bn1=False)
    image, threshold = golden["inpaint.image"], golden["inpaint.threshold"].item()
    mask = CF.saliency_mask(saliency, image, threshold, outpaint)
    out = CF.inpaint_filter(image, mask)
    ref = golden[key]
    assert 0.2 < ref[:, 3].mean() < 0.8  # a real mix of filled and kept pixels
    assert torch.equal(out[:, 3], ref[:, 3]), "mask differs from the official one"
    assert_close_scaled(out, ref, RTOL, name=key)


def test_inpaint_filter_user_mask(golden):
    out = CF.inpaint_filter(golden["inpaint.image"], golden["inpaint.user_mask"].bool())
    assert torch.equal(out, golden["inpaint.user_in"])


def test_sr_filter(golden):
    effnet = _filled(EfficientNetEncoder())
    latent, image = CF.sr_filter(effnet, golden["sr.x"], scale_factor=0.5)
    assert latent.shape == (1, 16, 4, 4)
    assert_close_scaled(latent, golden["sr.latent"], RTOL, name="sr.latent")
    assert torch.equal(image, golden["sr.image"])


# ------------------------------------------------------------------------------------------ ControlNet


def test_effnet_controlnet_c_in_1(golden):
    model = _filled(ControlNet(c_in=1, c_proj=64, proj_blocks=[0, 3, 9]))
    edges = golden["canny.edges"]
    with torch.no_grad():
        stem = model.backbone[0](edges)
        out = model(edges)
    # the unpadded stem gives 47×39 here; a padded one would give 48×40
    assert stem.shape == golden["canny.stem"].shape == (2, 24, 47, 39)
    assert_close_scaled(stem, golden["canny.stem"], RTOL, name="canny.stem")
    _assert_features(out, _features(golden, "canny.out", 10), "canny.out")


def test_effnet_controlnet_c_in_4(golden):
    model = _filled(ControlNet(c_in=4, c_proj=64, proj_blocks=[1, 4]))
    with torch.no_grad():
        out = model(golden["inpaint.in"])
    _assert_features(out, _features(golden, "inpaint.out", 5), "inpaint.out")


def test_effnet_controlnet_rgb(golden):
    model = _filled(ControlNet(c_in=3, c_proj=32, proj_blocks=[2]))
    with torch.no_grad():
        out = model(golden["rgb.x"])
    _assert_features(out, _features(golden, "rgb.out", 3), "rgb.out")


def test_simple_controlnet(golden):
    model = _filled(ControlNet(c_in=8, c_proj=32, proj_blocks=[0, 1, 2], bottleneck_mode="simple"), bn1=False)
    with torch.no_grad():
        out = model(golden["simple.x"])
    _assert_features(out, _features(golden, "simple.out", 3), "simple.out")


@pytest.mark.slow
def test_large_controlnet_full_size(golden):
    """The 'large' bottleneck has fixed widths (190M parameters here), hence full size and slow."""
    model = _filled(ControlNet(c_in=16, c_proj=64, proj_blocks=[0, 2], bottleneck_mode="large"), bn1=False)
    with torch.no_grad():
        out = model(golden["large.x"])
    _assert_features(out, _features(golden, "large.out", 3), "large.out")


def test_injection_into_stage_c_with_strength(golden):
    controlnet = _filled(ControlNet(c_in=1, c_proj=64, proj_blocks=[0, 3, 9]))
    stage_c = fill_(StageC(**TINY_STAGE_C_CONFIG), 0).eval()
    inputs = sub_dict({k: v for k, v in golden.items() if k.startswith("stagec.") and "out" not in k}, "stagec.")
    with torch.no_grad():
        cnet = controlnet(golden["canny.edges"])
        out = stage_c(**inputs, cnet=cnet)
        half = stage_c(**inputs, cnet=scale_features(cnet, 0.5))
        none = stage_c(**inputs)
        zero = stage_c(**inputs, cnet=scale_features(cnet, 0.0))
    assert_close_scaled(out, golden["stagec.out"], RTOL, name="stagec.out")
    assert_close_scaled(half, golden["stagec.out_half"], RTOL, name="stagec.out_half")
    assert_close_scaled(none, golden["stagec.out_none"], RTOL, name="stagec.out_none")
    assert (out - none).abs().max() > 0.01 * none.abs().max()
    torch.testing.assert_close(zero, none, rtol=0, atol=0)


def test_new_controlnet_leaves_stage_c_unchanged(golden):
    """Zero-initialised output projections (official): a fresh ControlNet is a no-op."""
    torch.manual_seed(0)
    controlnet = ControlNet(c_in=1, c_proj=64, proj_blocks=[0, 3, 9]).eval()
    stage_c = fill_(StageC(**TINY_STAGE_C_CONFIG), 0).eval()
    inputs = sub_dict({k: v for k, v in golden.items() if k.startswith("stagec.") and "out" not in k}, "stagec.")
    with torch.no_grad():
        cnet = controlnet(golden["canny.edges"])
        out = stage_c(**inputs, cnet=cnet)
        plain = stage_c(**inputs)
    assert all(c is None or c.abs().max() == 0 for c in cnet)
    assert torch.equal(out, plain)
