"""Parity of ``codec.diffusion`` with the official ``gdf`` package (golden_sampler.safetensors).

Every case of ``golden_sampler_settings.json`` is rerun with :func:`codec.diffusion.sample`
and compared with the final ``(x0, x)`` the official sampler yielded.
"""

from __future__ import annotations

import json

import pytest
import torch

from codec.diffusion import CosineSchedule, diffuse, noise_condition, p2_loss_weight, sample, vp_scalers

from helpers import DATA_DIR, assert_close_scaled, load_golden

SETTINGS = json.loads((DATA_DIR / "golden_sampler_settings.json").read_text())
CASES = SETTINGS["cases"]
SEEDED = [name for name, case in CASES.items() if case["seed"] is not None]
RTOL = 1e-5


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_golden("golden_sampler")


def toy_model(x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # "def model(x, r, c): return x * c.view(-1,1,1,1) + 0.1 * r.view(-1,1,1,1)"
    return x * c.view(-1, 1, 1, 1) + 0.1 * r.view(-1, 1, 1, 1)


def run_case(golden: dict[str, torch.Tensor], name: str,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one golden case; returns ``(x0, x)`` of the last step (x via the step callback)."""
    case = CASES[name]
    sampler = {"DDIMSampler": "ddim", "DDPMSampler": "ddpm"}[case["sampler"]]
    cfg = tuple(case["cfg"]) if isinstance(case["cfg"], list) else case["cfg"]
    x_init = golden[case["x_init"]] if case["x_init"] is not None else None
    shape = case.get("shape")
    assert (x_init is None) == (shape is not None)
    steps_seen: list[int] = []
    last: dict[str, torch.Tensor] = {}

    def callback(i: int, x0: torch.Tensor, x: torch.Tensor) -> None:
        steps_seen.append(i)
        last["x0"], last["x"] = x0, x

    x0 = sample(toy_model, {"c": golden["model_inputs.c"]}, shape=shape, uncond={"c": golden["unconditional.c"]},
                steps=case["timesteps"], cfg=cfg, cfg_rho=case["cfg_rho"], shift=case["shift"],
                t_start=case["t_start"], t_end=SETTINGS["_common"]["t_end"], sampler=sampler, x_init=x_init,
                generator=generator, callback=callback)
    assert steps_seen == list(range(case["timesteps"]))
    assert torch.equal(last["x0"], x0)
    return x0, last["x"]


def check_case(golden: dict[str, torch.Tensor], name: str, x0: torch.Tensor, x: torch.Tensor) -> None:
    assert_close_scaled(x0, golden[f"{name}.x0"], RTOL, name=f"{name}.x0")
    assert_close_scaled(x, golden[f"{name}.x"], RTOL, name=f"{name}.x")


@pytest.mark.parametrize("name", [n for n in CASES if n not in SEEDED])
def test_deterministic_case(golden, name):
    check_case(golden, name, *run_case(golden, name))


@pytest.mark.parametrize("name", SEEDED)
def test_seeded_case_global_rng(golden, name):
    """As the official code: ``torch.manual_seed(seed)`` then sample with the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CASES[name]["seed"])
        x0, x = run_case(golden, name)
    check_case(golden, name, x0, x)


@pytest.mark.parametrize("name", SEEDED)
def test_seeded_case_explicit_generator(golden, name):
    """A seeded ``torch.Generator`` gives the same numbers and leaves the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        state = torch.get_rng_state()
        x0, x = run_case(golden, name, generator=torch.Generator().manual_seed(CASES[name]["seed"]))
        assert torch.equal(torch.get_rng_state(), state), "sampling with a generator consumed the global RNG"
    check_case(golden, name, x0, x)


def test_img2img_start_is_official_diffuse(golden):
    # x_tstart08 = gdf.diffuse(x0=ones(2,16,24,24)*0.5, epsilon=x_init, t=full((2,),0.8), shift=1)[0]
    assert "shift=1" in SETTINGS["_common"]["x_tstart08"] and "t=torch.full((2,),0.8)" in SETTINGS["_common"]["x_tstart08"]
    x0 = torch.ones(2, 16, 24, 24) * 0.5
    x_t = diffuse(x0, t=0.8, noise=golden["x_init"], shift=1)[0]
    assert_close_scaled(x_t, golden["x_tstart08"], RTOL, name="x_tstart08")
    # and with an explicit t tensor, as the official call
    x_t2 = diffuse(x0, t=torch.full((2,), 0.8), noise=golden["x_init"], shift=1)[0]
    assert torch.equal(x_t, x_t2)


def test_img2img_from_own_diffuse(golden):
    """The t_start=0.8 case, starting from our own diffused latent instead of the stored one."""
    name = "ddim_tstart08"
    assert CASES[name]["x_init"] == "x_tstart08" and CASES[name]["t_start"] == 0.8
    x_t = diffuse(torch.ones(2, 16, 24, 24) * 0.5, t=0.8, noise=golden["x_init"], shift=1)[0]
    g = dict(golden, x_tstart08=x_t)
    check_case(golden, name, *run_case(g, name))


def test_schedule_tables(golden):
    t = golden["sched.t"]
    torch.testing.assert_close(t, torch.linspace(0, 1, 11))
    sched = CosineSchedule()
    # limits = schedule([1.0, 0.0], shift=1) = (min, max)
    torch.testing.assert_close(torch.tensor(sched.limits, dtype=torch.float32), golden["sched.limits"],
                               rtol=0, atol=1e-5)
    logsnr_s1, logsnr_s2 = sched(t, 1), sched(t, 2)
    a_s2, b_s2 = vp_scalers(logsnr_s2)
    tables = {"logsnr_s1": logsnr_s1, "logsnr_s2": logsnr_s2, "nc_s2": noise_condition(logsnr_s2),
              "a_s2": a_s2, "b_s2": b_s2, "p2_s1": p2_loss_weight(logsnr_s1)}
    for key, value in tables.items():
        ref = golden[f"sched.{key}"]
        assert value.shape == ref.shape, key
        torch.testing.assert_close(value, ref, rtol=0, atol=1e-5, msg=lambda m, key=key: f"sched.{key}: {m}")
    # the shifted schedule is clamped to the unshifted limits: t=1 gives the same logSNR
    assert logsnr_s2[-1] == logsnr_s1[-1]


def test_published_ddim_cfg4_rho07(golden):
    x0, _ = run_case(golden, "ddim_cfg4_rho07")
    x = x0.double()
    assert abs(x.sum().item() - (-3651.859)) <= 0.01
    assert x.mean().item() == pytest.approx(-0.19812603, rel=1e-5)
    assert x.std().item() == pytest.approx(0.93746370, rel=1e-5)


def test_published_ddpm_seed123(golden):
    name = "ddpm_cfg4"
    assert CASES[name]["seed"] == 123
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        x0, _ = run_case(golden, name)
    x = x0.double()
    assert x.mean().item() == pytest.approx(-0.04506632, rel=1e-5)
    assert x.std().item() == pytest.approx(0.46562585, rel=1e-5)


@pytest.mark.parametrize("key", sorted(SETTINGS["published_checks"]))
def test_published_checks_from_settings(golden, key):
    """Every published statistic listed in the settings file, on our own samples."""
    name = key.split(".", 1)[1]
    with torch.random.fork_rng(devices=[]):
        if CASES[name]["seed"] is not None:
            torch.manual_seed(CASES[name]["seed"])
        x0, _ = run_case(golden, name)
    x = x0.double()
    stats = {"sum": x.sum().item(), "mean": x.mean().item(), "std": x.std().item()}
    for stat, entry in SETTINGS["published_checks"][key].items():
        tol = 0.01 if stat == "sum" else 1e-5 * abs(entry["published"])
        assert abs(stats[stat] - entry["published"]) <= tol, f"{key}.{stat}: {stats[stat]} vs {entry['published']}"
