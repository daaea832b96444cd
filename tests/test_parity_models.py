"""Parity of the models with golden outputs computed once from the official Stable Cascade code.

See ``tests/data/README.md`` for how the golden data were produced (fill rule, configs, cases).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from codec.blocks import PackedAttention, r_embedding
from codec.effnet import EfficientNetEncoder
from codec.previewer import Previewer
from codec.stage_c import StageC
from codec.stage_a import StageA
from codec.stage_b import StageB

from helpers import DATA_DIR, TINY_STAGE_A_CONFIG, TINY_STAGE_B_CONFIG, TINY_STAGE_C_CONFIG, assert_close_scaled, \
    bn1_, fill_, load_golden, sub_dict

RTOL = 1e-4


# --------------------------------------------------------------------------------------------- Stage B


@pytest.fixture(scope="module")
def golden_b() -> dict[str, torch.Tensor]:
    return load_golden("golden_stage_b")


@pytest.fixture(scope="module")
def stage_b(golden_b) -> StageB:
    model = StageB(**TINY_STAGE_B_CONFIG)
    model.load_state_dict(sub_dict(golden_b, "sd."), strict=True)
    return model.eval()


def test_stage_b_tiny_keys_match_official_order():
    ref = json.loads((DATA_DIR / "stage_b_tiny_keys.json").read_text())
    ours = [[k, list(v.shape)] for k, v in StageB(**TINY_STAGE_B_CONFIG).state_dict().items()]
    assert ours == ref


def test_stage_b_fill_rule_reproduces_stored_weights(golden_b):
    stored = sub_dict(golden_b, "sd.")
    filled = fill_(StageB(**TINY_STAGE_B_CONFIG), 0).state_dict()
    assert set(filled) == set(stored)
    for key, value in filled.items():
        assert torch.equal(value, stored[key]), f"fill_ differs from the stored weights at {key}"


def _stage_b_inputs(golden: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    names = ("x", "r", "effnet", "clip", "pixels")
    return {n: golden[f"{case}.{n}"] for n in names if f"{case}.{n}" in golden}


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_stage_b_forward(stage_b, golden_b, case):
    inputs = _stage_b_inputs(golden_b, case)
    # Case b is the only one with pixels; a and c exercise the zeros default.
    assert ("pixels" in inputs) == (case == "b")
    with torch.no_grad():
        out = stage_b(**inputs)
    assert_close_scaled(out, golden_b[f"{case}.out"], RTOL, name=f"stage_b.{case}")


# --------------------------------------------------------------------------------------------- Stage C


@pytest.fixture(scope="module")
def golden_c() -> dict[str, torch.Tensor]:
    return load_golden("golden_stage_c")


@pytest.fixture(scope="module")
def stage_c() -> StageC:
    return fill_(StageC(**TINY_STAGE_C_CONFIG), 0).eval()


def test_stage_c_tiny_keys_and_fill_match_official():
    ref = json.loads((DATA_DIR / "stage_c_tiny_keys.json").read_text())
    state = fill_(StageC(**TINY_STAGE_C_CONFIG), 0).state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == [[k, shape] for k, shape, _ in ref]
    for (key, _, total), value in zip(ref, state.values()):
        assert value.double().sum().item() == pytest.approx(total, rel=1e-9, abs=1e-9), key


def _stage_c_inputs(golden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: golden[f"a.{n}"] for n in ("x", "r", "clip_text", "clip_text_pooled", "clip_img")}


def test_stage_c_forward(stage_c, golden_c):
    with torch.no_grad():
        out = stage_c(**_stage_c_inputs(golden_c))
    assert_close_scaled(out, golden_c["a.out"], RTOL, name="stage_c.a")


def test_stage_c_accepts_2d_pooled_and_image(stage_c, golden_c):
    inputs = _stage_c_inputs(golden_c)
    inputs["clip_text_pooled"] = inputs["clip_text_pooled"][:, 0]
    inputs["clip_img"] = inputs["clip_img"][:, 0]
    with torch.no_grad():
        out = stage_c(**inputs)
    assert_close_scaled(out, golden_c["a.out"], RTOL, name="stage_c.2d")


def test_stage_c_controlnet_injection(stage_c, golden_c):
    cnet = [golden_c.get(f"cnet.{i}") for i in range(10)]
    assert sum(c is not None for c in cnet) == 3
    with torch.no_grad():
        out = stage_c(**_stage_c_inputs(golden_c), cnet=cnet)
    assert_close_scaled(out, golden_c["cnet.out"], RTOL, name="stage_c.cnet")
    assert (out - golden_c["a.out"]).abs().max() > 1e-2 * golden_c["a.out"].abs().max()


# --------------------------------------------------------------------------------------------- Stage A


@pytest.fixture(scope="module")
def golden_a() -> dict[str, torch.Tensor]:
    return load_golden("golden_stage_a")


@pytest.fixture(scope="module")
def stage_a(golden_a) -> StageA:
    model = StageA(**TINY_STAGE_A_CONFIG)
    model.load_state_dict(sub_dict(golden_a, "sd."), strict=True)
    return model.eval()


def test_stage_a_fill_rule_reproduces_stored_weights(golden_a):
    stored = sub_dict(golden_a, "sd.")
    filled = fill_(StageA(**TINY_STAGE_A_CONFIG), 0).state_dict()
    assert set(filled) == set(stored)
    for key, value in filled.items():
        if value.is_floating_point():
            assert torch.equal(value, stored[key]), f"fill_ differs from the stored weights at {key}"


def test_stage_a_encode_decode(stage_a, golden_a):
    with torch.no_grad():
        enc = stage_a.encode(golden_a["x"])
        dec = stage_a.decode(golden_a["enc"])
    assert_close_scaled(enc, golden_a["enc"], RTOL, name="stage_a.enc")
    assert_close_scaled(dec, golden_a["dec"], RTOL, name="stage_a.dec")


def test_stage_a_encode_quantized(stage_a, golden_a):
    with torch.no_grad():
        q = stage_a.encode_quantized(golden_a["x"])
    assert q._fields == ("quantized", "latent", "indices", "loss")
    assert q.indices.dtype == torch.int64
    assert torch.equal(q.indices, golden_a["q.indices"])
    assert_close_scaled(q.quantized, golden_a["q.qe"], RTOL, name="stage_a.q.qe")
    assert_close_scaled(q.latent, golden_a["q.x"], RTOL, name="stage_a.q.x")
    assert q.loss.shape == golden_a["q.loss"].shape == ()
    torch.testing.assert_close(q.loss, golden_a["q.loss"], rtol=RTOL, atol=0)


# --------------------------------------------------------------------------------------------- EfficientNet


@pytest.fixture(scope="module")
def golden_effnet() -> dict[str, torch.Tensor]:
    return load_golden("golden_effnet")


def _effnet_outputs(model: EfficientNetEncoder, golden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"a.out": model(golden["a.x"]), "b.out": model(golden["b.x"]),
                "a.out_norm": model.encode(golden["a.x"])}


def test_effnet(golden_effnet):
    model = fill_(EfficientNetEncoder(), 0).eval()
    for key, out in _effnet_outputs(model, golden_effnet).items():
        assert_close_scaled(out, golden_effnet[key], RTOL, name=f"effnet.{key}")

    # bn1 variant: the same fill, then +1.0 on the weight of every affine BatchNorm2d
    # (the mapper's BN is not affine and so stays unchanged).
    assert bn1_(model) > 0
    outs = _effnet_outputs(model, golden_effnet)
    for key, out in outs.items():
        assert_close_scaled(out, golden_effnet[f"bn1.{key}"], RTOL, name=f"effnet.bn1.{key}")
    # With this variant the output depends on the input, so input handling is really checked.
    assert (outs["a.out"] - outs["a.out_norm"]).abs().max() > 100 * RTOL * outs["a.out"].abs().max()


# --------------------------------------------------------------------------------------------- Previewer


def test_previewer():
    golden = load_golden("golden_previewer")
    model = fill_(Previewer(), 0).eval()
    with torch.no_grad():
        out = model(golden["x"])
    assert_close_scaled(out, golden["out"], RTOL, name="previewer.out")


# --------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("embed_dim,num_heads", [(32, 4), (24, 1)])
def test_packed_attention_matches_multihead_attention(embed_dim, num_heads):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(embed_dim, num_heads, dropout=0.1, batch_first=True)
    fill_(ref, 3)  # non-zero biases too
    ours = PackedAttention(embed_dim, num_heads, dropout=0.1)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same parameter names and shapes
    ref.eval(), ours.eval()

    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 7, embed_dim, generator=g)
    kv = torch.randn(3, 11, embed_dim, generator=g)
    with torch.no_grad():
        expected, _ = ref(q, kv, kv, need_weights=False)
        out = ours(q, kv)
    assert out.shape == expected.shape == (3, 7, embed_dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_r_embedding_published_numbers():
    emb = r_embedding(torch.tensor([0.5, 0.99358]), 64)
    assert emb.shape == (2, 64) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0, 0:4], torch.tensor([-0.98796642, 0.99356705, 0.99611741, 0.78116286]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[0, 32:36], torch.tensor([0.15466841, 0.11324519, -0.08803463, -0.62432730]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[1, 31], torch.tensor(0.83798486), rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[1, 63], torch.tensor(0.54569352), rtol=0, atol=1e-6)


def test_r_embedding_golden():
    golden = load_golden("golden_sampler")
    emb = r_embedding(golden["remb.r"], TINY_STAGE_B_CONFIG["c_r"])
    torch.testing.assert_close(emb, golden["remb.out"], rtol=0, atol=1e-6)
