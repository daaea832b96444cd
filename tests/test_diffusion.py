"""The diffusion maths against its equations (official gdf semantics), for what the sampler goldens
(test_parity_sampler.py) do not reach: shifted and default noising, dtypes, the schedule's clamping of t, the P2
weight's parameters, training t, and how classifier-free guidance batches conditional with unconditional inputs.
Written to kill the mutants mutmut found surviving in codec/diffusion.py (docs/testing.md)."""

from __future__ import annotations

import math

import pytest
import torch

from codec.diffusion import CosineSchedule, diffuse, noise_condition, p2_loss_weight, sample


def alpha_bar(t: float, s: float = 0.008) -> float:
    """ᾱ(t) of the cosine schedule (improved DDPM), clamped to [1e-4, 0.9999] as official."""
    ab = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return min(max(ab, 1e-4), 0.9999)


def logsnr(t: float, shift: float = 1.0) -> float:
    """Official logSNR: log(ᾱ/(1−ᾱ)) − 2 ln shift, clipped to the unshifted limits [λ(1), λ(0)]."""
    lam = math.log(alpha_bar(t) / (1 - alpha_bar(t))) - 2 * math.log(shift)
    lo, hi = (math.log(alpha_bar(x) / (1 - alpha_bar(x))) for x in (1.0, 0.0))
    return min(max(lam, lo), hi)


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_diffuse_is_the_vp_equation_on_the_shifted_schedule(shift):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t, noise, lam, nc = diffuse(x0, t, noise=eps, shift=shift)
    for i, ti in enumerate(t.tolist()):
        a2 = 1 / (1 + math.exp(-logsnr(ti, shift)))  # sigmoid(λ)
        torch.testing.assert_close(x_t[i], math.sqrt(a2) * x0[i] + math.sqrt(1 - a2) * eps[i], rtol=1e-5, atol=1e-5)
        assert lam[i].item() == pytest.approx(logsnr(ti, shift), abs=1e-5)
    assert torch.equal(noise, eps)
    torch.testing.assert_close(nc, noise_condition(lam))


def test_diffuse_defaults_to_shift_1_and_draws_its_noise_from_the_generator():
    x0 = torch.ones(2, 3, 4, 4)
    x_t, noise, lam, _ = diffuse(x0, 0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(noise, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)))
    assert lam.tolist() == pytest.approx([logsnr(0.8)] * 2, rel=1e-6)
    # official §15 item 3: diffuse(ones, ε=2, t=0.8) → 2.2103012, λ −2.2652097
    x_t, _, lam, _ = diffuse(torch.ones(1, 1), 0.8, noise=torch.full((1, 1), 2.0))
    assert x_t.item() == pytest.approx(2.2103012, rel=1e-6) and lam.item() == pytest.approx(-2.2652097, rel=1e-6)


def test_diffuse_draws_noise_in_the_latents_dtype():
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)).bfloat16()
    _, noise, _, _ = diffuse(x0, 0.5, generator=torch.Generator().manual_seed(2))
    assert noise.dtype == torch.bfloat16
    assert torch.equal(noise, torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2)).bfloat16())


def test_schedule_clamps_t_to_0_1_before_the_formula():
    """Past t ≈ 3 the cosine turns positive again: only clamping t itself keeps λ(4) = λ(1)."""
    sched = CosineSchedule()
    outside = sched(torch.tensor([-0.5, -0.01, 1.01, 1.5, 3.5, 4.0]))
    inside = sched(torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(outside, inside)
    assert sched.limits == pytest.approx([-9.21024, 9.21007], abs=1e-5)  # official §15 item 3 (fp32)


@pytest.mark.parametrize("k,gamma,s", [(1.0, 1.0, 1.0), (0.5, 2.0, 1.0), (1.0, 1.0, 0.5), (2.0, 0.5, 3.0)])
def test_p2_loss_weight_is_k_plus_snr_to_the_s_to_the_minus_gamma(k, gamma, s):
    lam = torch.tensor([-3.0, -0.5, 0.0, 1.0, 2.5])
    expected = [(k + math.exp(s * x)) ** -gamma for x in lam.tolist()]
    assert p2_loss_weight(lam, k=k, gamma=gamma, s=s).tolist() == pytest.approx(expected, rel=1e-6)


def test_training_t_is_official_one_minus_u_plus_0_001_clamped():
    n = 20000  # about 20 draws of u < 0.001, where the clamp to 1 acts
    u = torch.rand(n, generator=torch.Generator().manual_seed(3))
    t = CosineSchedule().random_t(n, generator=torch.Generator().manual_seed(3))
    assert (u < 0.001).sum() > 5
    torch.testing.assert_close(t, (1 - u + 0.001).clamp(0.001, 1.0))
    assert t.min() >= 0.001 and t.max() == 1.0


class Recorder:
    """A toy epsilon model that records the inputs of every call: ``ε̂ = 0.1·x + mean of the condition``."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, r, c, cnet=None, tag=None):
        self.calls.append({"x": x, "c": c, "cnet": cnet, "tag": tag})
        return 0.1 * x + c.mean(dim=tuple(range(1, c.ndim))).view(-1, 1, 1, 1)


def test_guidance_batches_conditional_then_unconditional_inputs_of_every_kind():
    """Tensors and each tensor of a list (ControlNet features) are concatenated conditional first; ``None`` list
    entries stay ``None`` (also when one side lacks the tensor); other values pass unchanged; the unconditional
    tensor takes the conditional one's dtype."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 3, 2, 2, generator=g), None, torch.randn(2, 3, 2, 2, generator=g)]
    cond = {"c": torch.randn(2, 5, generator=g), "cnet": feats, "tag": "keep me"}
    uncond = {"c": torch.zeros(2, 5, dtype=torch.float64), "cnet": [torch.ones(2, 3, 2, 2), torch.ones(2, 3, 2, 2),
                                                                     None], "tag": "ignored"}
    model = Recorder()
    sample(model, cond, shape=(2, 1, 2, 2), uncond=uncond, steps=1, cfg=2.0, sampler="ddim",
           generator=torch.Generator().manual_seed(1))
    call = model.calls[0]
    assert call["c"].dtype == torch.float32 and call["c"].shape == (4, 5)
    assert torch.equal(call["c"], torch.cat([cond["c"], torch.zeros(2, 5)]))
    assert isinstance(call["cnet"], list) and len(call["cnet"]) == 3
    assert torch.equal(call["cnet"][0], torch.cat([feats[0], torch.ones(2, 3, 2, 2)]))
    assert call["cnet"][1] is None and call["cnet"][2] is None
    assert call["tag"] == "keep me"
    assert torch.equal(call["x"][:2], call["x"][2:])  # the same x twice


def test_guidance_refuses_inputs_with_different_keys_naming_them():
    with pytest.raises(ValueError) as e:
        sample(Recorder(), {"c": torch.zeros(1, 2), "cnet": None}, shape=(1, 1, 2, 2), uncond={"c": torch.zeros(1, 2)},
               cfg=2.0, steps=1)
    assert str(e.value) == ("conditional inputs ['c', 'cnet'] and unconditional inputs ['c'] must have the same keys")
