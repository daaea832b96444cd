"""Stage C in fp16: plain fp16 overflows on realistic activation scales, half_safe() matches fp32 within bf16's error.

The "grown" models (``benchmarks/stage_c_fp16.py``) are narrow random Stage Cs with the presets'
depth whose last up group amplifies the residual stream the way users observed with the
released weights: the large layout overflows fp16, the lite one does not.
"""

import copy

import pytest
import torch
from torch import nn

from benchmarks.stage_c_fp16 import error_rows, grown_stage_c, stage_c_inputs
from benchmarks.speed import random_state_dict
from codec.blocks import PackedAttention
from codec.fp16 import HalfLinear, HalfPackedAttention, half_linear, make_half_safe, row_l1_bound, \
    to_precision
from codec.presets import create_model

FP16_MAX = torch.finfo(torch.float16).max


@pytest.fixture(scope="module")
def rows():
    inputs = stage_c_inputs()
    table = {}
    for layout in ("stage_c_large", "stage_c_lite"):
        for row in error_rows(grown_stage_c(layout), inputs, layout):
            table[layout, row["mode"]] = row
    return table


def _tiny(seed=0):
    with torch.device("meta"):
        meta = create_model("stage_c_tiny")
    model = create_model("stage_c_tiny").eval()
    model.load_state_dict(random_state_dict(meta, seed, torch.float32))
    return model


def _tiny_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    inp = {"x": torch.randn(2, 16, 5, 7, generator=g), "r": torch.tensor([0.2, 0.7]),
           "clip_text": torch.randn(2, 6, 24, generator=g), "clip_text_pooled": torch.randn(2, 24, generator=g),
           "clip_img": torch.randn(2, 1, 16, generator=g)}
    return {k: v.to(dtype) for k, v in inp.items()}


def test_large_layout_overflows_plain_fp16_where_fp32_does_not(rows):
    fp32, plain = rows["stage_c_large", "fp32"], rows["stage_c_large", "fp16 plain"]
    assert fp32["finite"] and fp32["peak"] > 4 * FP16_MAX
    assert not plain["finite"]
    assert "half_safe()" in plain["refused"]  # StageC.forward raised NonFiniteError instead of returning NaN
    # where the community fix located it: the last group of the up path
    assert plain["overflow_at"].startswith("up_blocks.1.")


def test_lite_layout_stays_in_fp16_range(rows):
    """The construction reproduces the other half of the reports: the lite model works in plain fp16."""
    plain = rows["stage_c_lite", "fp16 plain"]
    assert plain["finite"] and not plain["refused"] and plain["peak"] < FP16_MAX


@pytest.mark.parametrize("layout", ["stage_c_large", "stage_c_lite"])
def test_half_safe_matches_fp32_within_bf16_error(rows, layout):
    safe, bf16 = rows[layout, "fp16-safe"], rows[layout, "bf16"]
    assert safe["finite"] and not safe["refused"]
    assert safe["peak"] == pytest.approx(rows[layout, "fp32"]["peak"], rel=1e-2)
    assert safe["rel_l2"] <= bf16["rel_l2"] / 4
    assert safe["rel_max"] <= bf16["rel_max"]


def test_half_linear_has_no_range_limit():
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(48, 64, generator=g) / 8).half()
    bias = torch.randn(48, generator=g)
    rows = torch.randn(6, 64, generator=g) * torch.tensor([1e-20, 1e-3, 1.0, 1e4, 1e12, 1e30])[:, None]
    out = half_linear(rows, weight, bias, row_l1_bound(weight))
    ref = rows.double() @ weight.double().T + bias.double()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = ((out.double() - ref).norm(dim=1) / ref.norm(dim=1))
    assert (rel < 2e-3).all(), rel
    # a worst case: every product positive, the exact sum far beyond fp16
    ones = torch.ones(4, 64, dtype=torch.float16)
    big = torch.full((1, 64), 3e4)
    assert half_linear(big, ones, None, row_l1_bound(ones)).eq(64 * 3e4).all()
    # zero rows give the bias exactly; non-finite rows stay non-finite
    special = torch.stack([torch.zeros(64), torch.full((64,), float("inf"))])
    out = half_linear(special, weight, bias, row_l1_bound(weight))
    assert torch.equal(out[0], bias) and not torch.isfinite(out[1]).any()


def test_half_safe_storage_keys_and_output():
    model = _tiny()
    keys = list(model.state_dict())
    ref = model(**_tiny_inputs())
    safe = copy.deepcopy(model).half_safe()
    assert list(safe.state_dict()) == keys
    assert make_half_safe(safe) is safe  # idempotent
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    attn_names = {n for n, m in model.named_modules() if isinstance(m, PackedAttention)}
    for name, module in safe.named_modules():
        if name in linear_names:
            assert isinstance(module, HalfLinear)
        if name in attn_names:
            assert isinstance(module, HalfPackedAttention)
    for key, t in safe.state_dict().items():
        halved = (key.endswith("in_proj_weight") or key.rsplit(".", 1)[0] in linear_names) and key.endswith("weight")
        assert t.dtype == (torch.float16 if halved else torch.float32), key
    with torch.no_grad():
        out = safe(**_tiny_inputs())
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(**_tiny_inputs()).float()
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < ((bf16 - ref).norm() / ref.norm()) / 4


def test_loading_into_a_converted_model_refreshes_the_bounds():
    source, target = _tiny(seed=0), _tiny(seed=5)
    expected = copy.deepcopy(source).half_safe()
    target.half_safe()
    stale = target.clip_txt_mapper.row_bound.clone()
    target.load_state_dict(source.state_dict())
    assert target.clip_txt_mapper.row_bound == row_l1_bound(expected.clip_txt_mapper.weight) != stale
    # assign=True (how codec.weights.load_module loads) puts bf16 tensors in; they are converted back
    assigned = _tiny(seed=5).half_safe()
    assigned.load_state_dict({k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}, assign=True)
    assert assigned.clip_txt_mapper.weight.dtype == torch.float16
    assert assigned.clip_txt_mapper.bias.dtype == torch.float32
    with torch.no_grad():
        a, b = target(**_tiny_inputs()), expected(**_tiny_inputs())
        c = assigned(**_tiny_inputs())
    assert torch.equal(a, b)
    assert torch.isfinite(c).all() and ((c - b).norm() / b.norm()) < 2e-2  # bf16-rounded weights


def test_weight_beyond_fp16_range_is_refused():
    model = _tiny()
    with torch.no_grad():
        model.down_blocks[0][0].channelwise[0].weight[0, 0] = 1e5
    with pytest.raises(ValueError, match=r"down_blocks\.0\.0\.channelwise\.0.*float16 range"):
        model.half_safe()


def test_half_safe_ignores_fp16_inputs_and_outer_autocast():
    safe = _tiny().half_safe()
    half_inputs = _tiny_inputs(torch.float16)
    cnet = [torch.randn(2, 64, 5, 7).half(), None, torch.randn(2, 64, 3, 4).half()]
    with torch.no_grad():
        ref = safe(**{k: v.float() for k, v in half_inputs.items()}, cnet=[None if c is None else c.float() for c in cnet])
        with torch.autocast("cpu", dtype=torch.float16):
            out = safe(**half_inputs, cnet=cnet)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_to_precision():
    assert getattr(to_precision(_tiny(), torch.float16), "compute_dtype", None) == torch.float32
    bf16 = to_precision(_tiny(), torch.bfloat16)
    assert not hasattr(bf16, "compute_dtype") and next(bf16.parameters()).dtype == torch.bfloat16
