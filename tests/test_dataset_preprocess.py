"""Preprocessing policies: the official bucket list, nearest-aspect assignment, crop boxes."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from datasets_tools.preprocess import bucket_sizes, nearest_bucket, preprocess

OFFICIAL_768 = [(768, 768), (1056, 512), (1312, 416), (928, 608), (864, 640), (1696, 320), (1184, 480), (960, 576),
                (832, 672), (1856, 288), (1024, 576)]


def test_official_bucket_list_768():
    assert bucket_sizes(768) == OFFICIAL_768 + [(w, h) for h, w in OFFICIAL_768[1:]]
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in bucket_sizes(1024))


def test_nearest_bucket():
    b = bucket_sizes(768)
    assert nearest_bucket(1000, 1000, b) == (768, 768)
    assert nearest_bucket(1600, 900, b) == (1024, 576)
    assert nearest_bucket(900, 1600, b) == (576, 1024)
    assert nearest_bucket(2000, 1000, b) == (1056, 512)


def test_center_matches_torchvision_resize_then_crop():
    x = torch.rand(3, 100, 150)
    p = preprocess(x, "center", 64)
    ref = TF.center_crop(TF.resize(x, 64, antialias=True), [64, 64])
    assert torch.equal(p.pixels, ref.clamp(0, 1))
    assert p.orig_size == (100, 150) and p.bucket == (64, 64)
    assert p.crop_box == (25, 0, 125, 100)  # centre 100×100 of the original


def test_buckets_and_keep_aspect_boxes():
    x = torch.rand(3, 1000, 500)
    p = preprocess(x, "buckets", 768)
    assert p.bucket == (1056, 512) and p.pixels.shape == (3, 1056, 512)
    left, top, right, bottom = p.crop_box
    assert (top, bottom) == (0, 1000) and 0 < left < right < 500  # width cropped, height kept
    k = preprocess(torch.rand(3, 100, 150), "keep-aspect", 64)
    assert k.bucket == (64, 96) and k.pixels.shape == (3, 64, 96) and k.crop_box == (0, 0, 150, 100)
    assert preprocess(torch.rand(3, 64, 70), "keep-aspect", 64).bucket == (64, 64)


def test_bad_policy_and_size():
    with pytest.raises(ValueError, match="policy"):
        preprocess(torch.rand(3, 8, 8), "stretch", 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        preprocess(torch.rand(3, 8, 8), "center", 50)


def _reference(x, policy, size):
    """The pre-refactor preprocess (resize + centre crop in one function), kept to pin bit-identity."""
    import math

    from datasets_tools.preprocess import FACTOR

    h, w = x.shape[-2:]

    def short(h, w):
        return (size, int(size * w / h)) if h <= w else (int(size * h / w), size)

    if policy == "center":
        (rh, rw), (ch, cw) = short(h, w), (size, size)
    elif policy == "keep-aspect":
        rh, rw = short(h, w)
        ch, cw = rh // FACTOR * FACTOR, rw // FACTOR * FACTOR
    else:
        ch, cw = nearest_bucket(h, w, bucket_sizes(size))
        scale = max(ch / h, cw / w)
        rh, rw = max(ch, math.ceil(h * scale - 1e-9)), max(cw, math.ceil(w * scale - 1e-9))
    if (rh, rw) != (h, w):
        x = TF.resize(x, [rh, rw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True).clamp_(0, 1)
    top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))
    sy, sx = h / rh, w / rw
    box = (round(left * sx), round(top * sy), round((left + cw) * sx), round((top + ch) * sy))
    return x[:, top:top + ch, left:left + cw].contiguous(), (h, w), box, (ch, cw)


@pytest.mark.parametrize("policy", ["center", "keep-aspect", "buckets"])
@pytest.mark.parametrize("hw", [(97, 211), (211, 97), (129, 129), (65, 333), (301, 45), (64, 64)])
def test_geometry_then_apply_reproduces_preprocess_exactly(policy, hw):
    from codec.images import from_uint8
    from datasets_tools.preprocess import apply_geometry, geometry

    g = torch.Generator().manual_seed(hw[0] * 1000 + hw[1])
    u8 = torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=g)
    x = from_uint8(u8)
    ref_pixels, orig, box, bucket = _reference(x.clone(), policy, 64)
    geo = geometry(*hw, policy, 64)
    assert (geo.orig_size, geo.crop_box, geo.bucket) == (orig, box, bucket)
    assert torch.equal(apply_geometry(x, geo), ref_pixels)
    p = preprocess(x, policy, 64)
    assert torch.equal(p.pixels, ref_pixels) and (p.orig_size, p.crop_box, p.bucket) == (orig, box, bucket)
    # batched input gives the same per-image result; the input is left alone
    both = apply_geometry(torch.stack([x, x]), geo)
    assert torch.equal(both[0], ref_pixels) and torch.equal(both[1], ref_pixels)
    assert torch.equal(x, from_uint8(u8))
    with pytest.raises(ValueError):
        apply_geometry(x[:, 1:], geo)
