"""Codec API on tiny random weights: shapes at odd sizes, determinism, bad input, NaN detection."""

import pytest
import torch

from codec import Codec
from codec.codec import default_output_size, encoder_input_size, stage_a_latent_size
from codec.errors import NonFiniteError


def test_size_rules():
    assert encoder_input_size(1024, 1024) == (768, 768)
    assert encoder_input_size(1000, 600) == (736, 448)
    assert encoder_input_size(20, 20) == (32, 32)
    assert default_output_size(24, 24) == (1024, 1024)
    assert stage_a_latent_size(1024, 1024) == (256, 256)
    assert stage_a_latent_size(1000, 600) == (250, 150)
    assert stage_a_latent_size(1001, 333) == (252, 84)
    assert stage_a_latent_size(40, 8) == (16, 16)


def test_encode_shapes(tiny_codec):
    z = tiny_codec.encode(torch.rand(2, 3, 128, 96))
    assert z.shape == (2, 16, 3, 2) and z.dtype == torch.float32
    mixed = tiny_codec.encode([torch.rand(3, 64, 64), torch.rand(3, 128, 64)])
    assert isinstance(mixed, list) and [t.shape for t in mixed] == [(1, 16, 1, 1), (1, 16, 3, 1)]
    assert tiny_codec.encode(torch.rand(1, 3, 128, 128), scale=1.0).shape == (1, 16, 4, 4)
    bil = tiny_codec.encode(torch.rand(1, 3, 128, 128), resize="bilinear")
    assert bil.shape == (1, 16, 3, 3)


def test_encode_uses_the_nearest_resize_of_the_official_notebook(tiny_codec):
    x = torch.rand(1, 3, 128, 128)
    small = torch.nn.functional.interpolate(x, size=(96, 96), mode="nearest")
    ref = tiny_codec.effnet.encode(small)
    assert torch.allclose(tiny_codec.encode(x), ref, atol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (60, 44), (100, 52), (68, 72), (50, 30)])
def test_decode_any_size(tiny_codec, size):
    h, w = size
    out = tiny_codec.decode(torch.randn(1, 16, 2, 2), height=h, width=w, steps=2, output="tensor")
    assert out.shape == (1, 3, h, w)
    assert out.min() >= 0 and out.max() <= 1


def test_decode_is_deterministic_per_seed(tiny_codec):
    z = torch.randn(2, 16, 2, 2)
    a = tiny_codec.decode(z, height=32, width=32, steps=3, seed=5, output="tensor")
    b = tiny_codec.decode(z, height=32, width=32, steps=3, seed=5, output="tensor")
    c = tiny_codec.decode(z, height=32, width=32, steps=3, seed=6, output="tensor")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decode_batches_match_the_sampler_called_directly(tiny_codec):
    """Codec.decode = official sampler on Stage B (cond/uncond as official) + Stage A decode."""
    from codec.diffusion import sample

    z = torch.randn(1, 16, 2, 2)
    got = tiny_codec.decode(z, height=32, width=32, steps=3, seed=1, output="tensor")
    clip = tiny_codec.empty_clip.reshape(1, 1, -1)
    lat = sample(tiny_codec.stage_b, {"effnet": z, "clip": clip}, shape=(1, 4, 16, 16),
                 uncond={"effnet": torch.zeros_like(z), "clip": clip}, steps=3, cfg=1.1, shift=1,
                 generator=torch.Generator().manual_seed(1))
    ref = tiny_codec.stage_a.decode(lat)[..., :32, :32].clamp(0, 1)
    assert torch.allclose(got, ref, atol=1e-6)


def test_wrong_latents_are_explained(tiny_codec):
    with pytest.raises(ValueError, match=r"expected EfficientNet latents of shape \(B, 16, h, w\)"):
        tiny_codec.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        tiny_codec.decode(torch.full((1, 16, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="floating point"):
        tiny_codec.decode(torch.zeros(1, 16, 2, 2, dtype=torch.long))


def test_nan_in_a_model_output_is_reported_not_returned(tiny_weights):
    codec = Codec.from_pretrained(tiny_weights, device="cpu")
    with torch.no_grad():
        codec.stage_a.out_block[0].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="Stage A"):
        codec.decode(torch.randn(1, 16, 2, 2), height=32, width=32, steps=1)


def test_bf16_stage_b_runs_without_caller_autocast(tiny_weights):
    codec = Codec.from_pretrained(tiny_weights, device="cpu", dtype="bf16")
    assert next(codec.stage_b.parameters()).dtype == torch.bfloat16
    assert next(codec.stage_a.parameters()).dtype == torch.float32
    out = codec.decode(torch.randn(1, 16, 2, 2), height=32, width=32, steps=2, output="tensor")
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_reconstruct_keeps_the_size(tiny_codec):
    img = tiny_codec.reconstruct(torch.rand(3, 70, 50), steps=1)[0]
    assert img.size == (50, 70)


def test_preview(tiny_codec):
    assert tiny_codec.preview(torch.randn(1, 16, 3, 2))[0].size == (16, 24)


def test_info_labels_tiny_weights(tiny_codec):
    info = tiny_codec.info()
    assert info["components"]["stage_b"]["params"] == sum(p.numel() for p in tiny_codec.stage_b.parameters())
    assert "TINY RANDOM" in info["components"]["stage_b"]["note"]


def test_a_decode_that_cannot_fit_is_refused_before_any_work(tiny_codec, monkeypatch):
    """A 20000² decode ran for over 10 minutes and then ran out of memory; now the estimate refuses it up front."""
    import codec.codec as C
    from codec.errors import UsageError

    z = torch.randn(1, 16, 2, 2)
    calls = []
    real = tiny_codec.stage_b.forward
    monkeypatch.setattr(tiny_codec.stage_b, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(C, "available_bytes", lambda device: 10 * 2**30)
    monkeypatch.setattr(tiny_codec, "_bytes_per_pixel", None)  # the probe runs once per codec: make it run here
    with pytest.raises(UsageError, match=r"decoding 1 image\(s\) of 20000×20000 needs about .* GiB .* 10.0 GiB free"):
        tiny_codec.decode(z, height=20000, width=20000, steps=1)
    assert len(calls) == 1  # the probe only: no sampling step ran
    assert tiny_codec.decode(z, height=64, width=64, steps=1, output="tensor").shape == (1, 3, 64, 64)
    monkeypatch.setattr(C, "available_bytes", lambda device: None)  # unknown: no check
    assert tiny_codec.decode(z, height=64, width=64, steps=1, output="tensor").shape == (1, 3, 64, 64)
