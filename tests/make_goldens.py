"""Regenerate the golden test data of ``tests/data`` by running the **official** Stable Cascade code.

The goldens are the official code's outputs, so this script needs that code; it is not a dependency of the
project and is not installed. Get it once, at the commit the goldens were made from::

    git clone https://github.com/Stability-AI/StableCascade /tmp/StableCascade
    git -C /tmp/StableCascade checkout 7a7d341      # "Gradio App (#43)"
    pip install opencv-python-headless              # cv2.Canny for the canny ControlNet filter (in the dev extra)

then, from the repository root (CPU, fp32; about two minutes and 3 GB of memory, the large ControlNet included)::

    python tests/make_goldens.py --official /tmp/StableCascade --check    # compare with tests/data, write nothing
    python tests/make_goldens.py --official /tmp/StableCascade            # rewrite tests/data/ + GOLDENS.json

``--only stage_b,sampler`` limits the run. Nothing of the official code is changed on disk. Its imports that need
packages or files it does not ship are given stand-ins in ``sys.modules`` here, exactly as ``tests/data/README.md``
describes: ``torchtools.nn.VectorQuantize`` (a forward-only nearest-codebook quantiser), the EfficientNet backbone
built with ``weights=None`` (no ImageNet download), and empty modules for what ``modules/controlnet.py`` imports
only for filters the goldens do not use (kornia, insightface, PiDiNet, the ArcFace face-ID module,
``core.utils.load_or_fail``). Filters that load weight files in their constructor are built with ``__new__`` and
their attributes set by hand; their ``__call__`` runs unchanged.

Every model is filled with the rule of ``tests/helpers.py`` (:func:`helpers.fill_`, seed 0); inputs come from
``torch.Generator().manual_seed(1)`` per case unless a builder says otherwise. Each ``.safetensors`` golden records
its generator, source, seeds and library versions in its metadata, and ``tests/data/GOLDENS.json`` records the same
for every file (JSON ones included) with its sha256.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import json
import math
import platform
import sys
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from helpers import TINY_STAGE_A_CONFIG, TINY_STAGE_B_CONFIG, TINY_STAGE_C_CONFIG, bn1_, fill_  # noqa: E402

OFFICIAL_REPO = "https://github.com/Stability-AI/StableCascade"
OFFICIAL_COMMIT = "7a7d341"
DATA = TESTS / "data"
# Published sampler statistics (reference/official.md §15, item 4) that golden_sampler_settings.json checks.
PUBLISHED = {
    "sampler.ddim_cfg4_rho07": {"sum": -3651.859, "mean": -0.19812603, "std": 0.9374637},
    "sampler.ddim_cfg4_rho0": {"mean": -0.03025875, "std": 0.01168487},
    "sampler.ddim_nocfg": {"mean": -1.60050571, "std": 8.13966084},
    "sampler.ddpm_cfg4": {"mean": -0.04506632, "std": 0.46562585},
}


# --------------------------------------------------------------------------------------------- the official code

def _vector_quantize_stand_in() -> type:
    """``torchtools.nn.VectorQuantize``, forward only: nearest codebook row by ``|c|² + |x|² − 2 x·c`` (torchtools'
    distance, via ``addmm``); returns ``(quantized, (vq_loss, commit_loss), indices)`` with both losses the mean
    squared quantisation error, as torchtools computes them."""
    from torch import nn

    class VectorQuantize(nn.Module):
        def __init__(self, embedding_size: int, k: int, ema_decay: float = 0.99, ema_loss: bool = False):
            super().__init__()
            self.codebook = nn.Embedding(k, embedding_size)

        def forward(self, x: torch.Tensor, get_losses: bool = True, dim: int = -1):
            if dim != -1:
                x = x.movedim(dim, -1)
            flat = x.contiguous().view(-1, x.size(-1))
            codebook = self.codebook.weight.detach()
            distances = torch.addmm(codebook.pow(2).sum(1) + flat.pow(2).sum(1, keepdim=True), flat, codebook.t(),
                                    alpha=-2.0, beta=1.0)
            indices = distances.argmin(dim=1)
            chosen = codebook.index_select(0, indices)
            vq_loss = (chosen - flat.detach()).pow(2).mean()
            commit_loss = (flat - chosen.detach()).pow(2).mean()
            quantized = chosen.view(x.shape)
            if dim != -1:
                quantized = quantized.movedim(-1, dim)
            return quantized, (vq_loss, commit_loss), indices.view(x.shape[:-1])

    return VectorQuantize


def _stub(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def import_official(path: Path) -> types.SimpleNamespace:
    """The official modules and ``gdf`` from a checkout at ``path``, with the stand-ins of the module docstring."""
    import torchvision

    path = Path(path).resolve()
    if not (path / "modules" / "stage_c.py").is_file() or not (path / "gdf" / "__init__.py").is_file():
        raise SystemExit(f"{path} is not a checkout of {OFFICIAL_REPO} (no modules/stage_c.py, gdf/); see --help.")

    class _Unused:
        def __init__(self, *args: Any, **kwargs: Any):
            raise RuntimeError("a stand-in for a module the goldens do not use was called")

    def _load_or_fail(*args: Any, **kwargs: Any):
        raise RuntimeError("the goldens load no weight files; build the filter with __new__")

    _stub("torchtools")
    _stub("torchtools.nn", VectorQuantize=_vector_quantize_stand_in())
    _stub("kornia")
    _stub("insightface")
    _stub("insightface.app")
    _stub("insightface.app.common", Face=_Unused)
    _stub("core", __path__=[])
    _stub("core.utils", load_or_fail=_load_or_fail)
    _stub("modules.cnet_modules.pidinet", PidiNetDetector=_Unused)
    _stub("modules.cnet_modules.face_id", __path__=[])
    _stub("modules.cnet_modules.face_id.arcface", FaceDetector=_Unused, ArcFaceRecognizer=_Unused)

    real_v2_s = torchvision.models.efficientnet_v2_s

    def efficientnet_v2_s(*args: Any, weights: Any = None, **kwargs: Any):
        return real_v2_s(*args, weights=None, **kwargs)  # 'DEFAULT' would download ImageNet weights

    torchvision.models.efficientnet_v2_s = efficientnet_v2_s
    sys.path.insert(0, str(path))
    ns = types.SimpleNamespace(path=path, commit=_git_commit(path))
    for name in ("modules.stage_a", "modules.stage_b", "modules.stage_c", "modules.effnet", "modules.previewer",
                 "modules.controlnet", "modules.cnet_modules.inpainting.saliency_model", "gdf"):
        setattr(ns, name.rsplit(".", 1)[-1], importlib.import_module(name))
    return ns


def _git_commit(path: Path) -> str:
    import subprocess

    r = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else "unknown (not a git checkout)"


# --------------------------------------------------------------------------------------------- helpers

def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _outputs(prefix: str, outs: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{i}": t for i, t in enumerate(outs) if t is not None}


def _key_list(model: torch.nn.Module, with_sum: bool = False) -> list[list[Any]]:
    if with_sum:
        return [[k, list(v.shape), float(v.double().sum())] for k, v in model.state_dict().items()]
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def _meta_keys(build: Callable[[], torch.nn.Module]) -> dict[str, Any]:
    with torch.device("meta"):
        model = build()
    return {"keys": [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()],
            "n_params": sum(p.numel() for p in model.parameters())}


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _imagenet(x: torch.Tensor) -> torch.Tensor:
    import torchvision

    return torchvision.transforms.Normalize(*IMAGENET)(x)


# --------------------------------------------------------------------------------------------- the goldens
# Each builder returns {file name: content}: a dict of tensors (a .safetensors file) or JSON data.

def stage_b(off: types.SimpleNamespace) -> dict[str, Any]:
    """Tiny Stage B at three sizes (the odd ones take the decoder's resize-to-skip path)."""
    model = fill_(off.stage_b.StageB(**TINY_STAGE_B_CONFIG)).eval()
    out = {f"sd.{k}": v.clone() for k, v in model.state_dict().items()}
    cases = {"a": ((2, 4, 32, 32), [0.3, 0.9], (2, 16, 3, 3), (2, 1, 24), None),
             "b": ((1, 4, 20, 28), [0.5], (1, 16, 2, 3), (1, 24), (1, 3, 8, 8)),
             "c": ((1, 4, 36, 20), [0.99], (1, 16, 5, 3), (1, 1, 24), None)}
    with torch.no_grad():
        for case, (xs, r, es, cs, ps) in cases.items():
            g = _gen(1)
            inputs = {"x": torch.randn(xs, generator=g), "r": torch.tensor(r), "effnet": torch.randn(es, generator=g),
                      "clip": torch.randn(cs, generator=g)}
            if ps is not None:
                inputs["pixels"] = torch.randn(ps, generator=g)
            out.update({f"{case}.{k}": v for k, v in inputs.items()})
            out[f"{case}.out"] = model(**inputs)
    return {"golden_stage_b.safetensors": out, "stage_b_tiny_keys.json": _key_list(model)}


def stage_c(off: types.SimpleNamespace) -> dict[str, Any]:
    """Tiny Stage C with and without ControlNet features (weights rebuilt by the tests, sums recorded)."""
    model = fill_(off.stage_c.StageC(**TINY_STAGE_C_CONFIG)).eval()
    g = _gen(1)
    inputs = {"x": torch.randn(2, 16, 6, 5, generator=g), "r": torch.tensor([0.2, 0.7]),
              "clip_text": torch.randn(2, 7, 32, generator=g), "clip_text_pooled": torch.randn(2, 1, 32, generator=g),
              "clip_img": torch.randn(2, 1, 24, generator=g)}
    g2 = _gen(2)
    cnet: list[torch.Tensor | None] = [None] * 10
    for i in (0, 3, 9):
        cnet[i] = torch.randn(2, 64, 3, 3, generator=g2)
    with torch.no_grad():
        out = {f"a.{k}": v for k, v in inputs.items()} | {"a.out": model(**inputs)}
        out |= _outputs("cnet", cnet) | {"cnet.out": model(**inputs, cnet=cnet)}
    return {"golden_stage_c.safetensors": out, "stage_c_tiny_keys.json": _key_list(model, with_sum=True)}


def stage_a(off: types.SimpleNamespace) -> dict[str, Any]:
    """Tiny Stage A: encode, decode, and encode through the quantiser."""
    model = fill_(off.stage_a.StageA(**TINY_STAGE_A_CONFIG)).eval()
    x = torch.rand(2, 3, 32, 24, generator=_gen(1))
    with torch.no_grad():
        enc = model.encode(x)[0]
        qe, qx, indices, loss = model.encode(x, quantize=True)
        out = {"x": x, "enc": enc, "dec": model.decode(enc), "q.qe": qe, "q.x": qx, "q.indices": indices,
               "q.loss": loss}
    return {"golden_stage_a.safetensors": out | {f"sd.{k}": v.clone() for k, v in model.state_dict().items()}}


def effnet(off: types.SimpleNamespace) -> dict[str, Any]:
    """Full-size EfficientNet encoder, plain fill and the bn1 variant (see tests/data/README.md's caveat)."""
    model = fill_(off.effnet.EfficientNetEncoder()).eval()
    g = _gen(1)
    a, b = torch.rand(1, 3, 96, 64, generator=g), torch.rand(1, 3, 70, 50, generator=g)
    out = {"a.x": a, "b.x": b}
    with torch.no_grad():
        for prefix in ("", "bn1."):
            if prefix:
                bn1_(model)
            out |= {f"{prefix}a.out": model(a), f"{prefix}b.out": model(b), f"{prefix}a.out_norm": model(_imagenet(a))}
    return {"golden_effnet.safetensors": out}


def previewer(off: types.SimpleNamespace) -> dict[str, Any]:
    """The Previewer on a 4×3 latent."""
    model = fill_(off.previewer.Previewer()).eval()
    x = torch.randn(1, 16, 4, 3, generator=_gen(1))
    with torch.no_grad():
        return {"golden_previewer.safetensors": {"x": x, "out": model(x)}}


SAMPLER_CASES: dict[str, dict[str, Any]] = {
    "ddim_cfg4_rho07": dict(sampler="DDIMSampler", timesteps=20, shift=2, t_start=1.0, cfg=4, cfg_rho=0.7,
                            x_init="x_init", seed=None),
    "ddim_cfg4_rho0": dict(sampler="DDIMSampler", timesteps=20, shift=2, t_start=1.0, cfg=4, cfg_rho=0.0,
                           x_init="x_init", seed=None),
    "ddim_nocfg": dict(sampler="DDIMSampler", timesteps=20, shift=2, t_start=1.0, cfg=None, cfg_rho=0.7,
                       x_init="x_init", seed=None),
    "ddpm_cfg4": dict(sampler="DDPMSampler", timesteps=20, shift=2, t_start=1.0, cfg=4, cfg_rho=0.7,
                      x_init="x_init", seed=123),
    "ddpm_noinit": dict(sampler="DDPMSampler", timesteps=10, shift=1, t_start=1.0, cfg=1.1, cfg_rho=0.7,
                        x_init=None, shape=[2, 4, 16, 16], seed=7),
    "ddim_tstart08": dict(sampler="DDIMSampler", timesteps=16, shift=2, t_start=0.8, cfg=4, cfg_rho=0.7,
                          x_init="x_tstart08", seed=None),
    "ddpm_cfgpair": dict(sampler="DDPMSampler", timesteps=8, shift=1, t_start=1.0, cfg=[5, 1], cfg_rho=0.7,
                         x_init="x_init", seed=11),
}


def sampler(off: types.SimpleNamespace) -> dict[str, Any]:
    """The official ``gdf`` sampler loop on a toy model: seven cases, the schedule tables, Stage B's r-embedding."""
    gdf = off.gdf

    def make() -> Any:
        return gdf.GDF(schedule=gdf.CosineSchedule(clamp_range=[0.0001, 0.9999]), input_scaler=gdf.VPScaler(),
                       target=gdf.EpsilonTarget(), noise_cond=gdf.CosineTNoiseCond(), loss_weight=gdf.P2LossWeight())

    def model(x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x * c.view(-1, 1, 1, 1) + 0.1 * r.view(-1, 1, 1, 1)

    cond, uncond = {"c": torch.tensor([0.5, 0.6])}, {"c": torch.tensor([0.1, 0.1])}
    starts = {"x_init": torch.randn(2, 16, 24, 24, generator=_gen(0))}
    starts["x_tstart08"] = make().diffuse(x0=torch.ones(2, 16, 24, 24) * 0.5, epsilon=starts["x_init"],
                                          t=torch.full((2,), 0.8), shift=1)[0]
    out: dict[str, torch.Tensor] = {**starts, "model_inputs.c": cond["c"], "unconditional.c": uncond["c"]}
    with torch.no_grad():
        for name, case in SAMPLER_CASES.items():
            g = make()
            x_init = starts[case["x_init"]] if case["x_init"] else None
            shape = case.get("shape") or list(x_init.shape)
            if case["seed"] is not None:
                torch.manual_seed(case["seed"])
            cfg = tuple(case["cfg"]) if isinstance(case["cfg"], list) else case["cfg"]
            last = None
            for last in g.sample(model, cond, shape, unconditional_inputs=uncond,
                                 sampler=getattr(gdf, case["sampler"])(g), t_start=case["t_start"], t_end=0.0,
                                 timesteps=case["timesteps"], x_init=x_init, cfg=cfg, cfg_rho=case["cfg_rho"],
                                 shift=case["shift"]):
                pass
            out[f"{name}.x0"], out[f"{name}.x"] = last[0], last[1]
        g = make()
        t = torch.linspace(0, 1, 11)
        s1, s2 = g.schedule(t, shift=1), g.schedule(t, shift=2)
        a2, b2 = g.input_scaler(s2)
        out |= {"sched.t": t, "sched.logsnr_s1": s1, "sched.logsnr_s2": s2, "sched.nc_s2": g.noise_cond(s2),
                "sched.a_s2": a2, "sched.b_s2": b2, "sched.p2_s1": g.loss_weight(s1),
                "sched.limits": torch.tensor(g.schedule.limits)}
        r = torch.tensor([0.0, 0.5, 0.99358])
        out |= {"remb.r": r, "remb.out": off.stage_b.StageB(**TINY_STAGE_B_CONFIG).gen_r_embedding(r)}
    return {"golden_sampler.safetensors": out, "golden_sampler_settings.json": _sampler_settings(out)}


def _sampler_settings(out: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The description of golden_sampler.safetensors, with the published statistics checked on its samples."""
    checks: dict[str, Any] = {}
    for key, stats in PUBLISHED.items():
        x0 = out[key.split(".", 1)[1] + ".x0"].double()
        measured = {"sum": x0.sum().item(), "mean": x0.mean().item(), "std": x0.std().item()}
        checks[key] = {}
        for stat, published in stats.items():
            err = abs(measured[stat] - published) / abs(published)
            tol = 0.01 if stat == "sum" else 1e-5 * abs(published)
            checks[key][stat] = {"published": published, "measured": measured[stat], "rel_err": err,
                                 "ok": abs(measured[stat] - published) <= tol}
    return {
        "_common": {
            "gdf": "GDF(schedule=CosineSchedule(clamp_range=[0.0001, 0.9999]), input_scaler=VPScaler(), "
                   "target=EpsilonTarget(), noise_cond=CosineTNoiseCond(), loss_weight=P2LossWeight())  "
                   "(offset_noise=0, no setup_limits call; a fresh GDF and sampler per case)",
            "model": "def model(x, r, c): return x * c.view(-1,1,1,1) + 0.1 * r.view(-1,1,1,1)",
            "model_inputs": {"c": [0.5, 0.6]},
            "unconditional_inputs": {"c": [0.1, 0.1]},
            "x_init": "torch.randn(2,16,24,24, generator=torch.Generator().manual_seed(0))  (stored as x_init)",
            "x_tstart08": "gdf.diffuse(x0=torch.ones(2,16,24,24)*0.5, epsilon=x_init, t=torch.full((2,),0.8), "
                          "shift=1)[0]  (stored as x_tstart08)",
            "t_end": 0.0, "cfg_t_stop": None, "cfg_t_start": None, "sampler_params": None, "device": "cpu",
            "call": "torch.manual_seed(seed) if seed is not None; then iterate gdf.sample(model, model_inputs, shape, "
                    "unconditional_inputs=..., sampler=Sampler(gdf), t_start=..., t_end=0.0, timesteps=..., "
                    "x_init=..., cfg=..., cfg_rho=..., shift=...) to exhaustion; <case>.x0 / <case>.x = element 0 / "
                    "1 of the last yielded tuple",
            "cfg_pair": "cfg given as tuple (5, 1): cfg_val = 5*r + 1*(1-r) per step",
        },
        "cases": SAMPLER_CASES,
        "sched": {
            "t": "torch.linspace(0,1,11)", "logsnr_s1": "gdf.schedule(t, shift=1)",
            "logsnr_s2": "gdf.schedule(t, shift=2)", "nc_s2": "gdf.noise_cond(logsnr_s2)",
            "a_s2,b_s2": "gdf.input_scaler(logsnr_s2)",
            "p2_s1": "gdf.loss_weight(logsnr_s1)  (P2LossWeight k=1,gamma=1,s=1, shift=1)",
            "limits": "gdf.schedule.limits = schedule([1.0, 0.0], shift=1) set at construction (min, max); every "
                      "schedule() output is clamped to it after the shift offset",
        },
        "remb": "StageB(<tiny config>).gen_r_embedding(torch.tensor([0.0, 0.5, 0.99358])), c_r=64, "
                "max_positions=10000",
        "torch_version": torch.__version__,
        "published_checks": checks,
    }


def official_keys(off: types.SimpleNamespace) -> dict[str, Any]:
    """Ordered state-dict keys, shapes and dtypes of every full-size model, built on the meta device."""
    sb, sc = off.stage_b.StageB, off.stage_c.StageC
    builders = {
        "stage_a": lambda: off.stage_a.StageA(),
        "effnet": lambda: off.effnet.EfficientNetEncoder(),
        "previewer": lambda: off.previewer.Previewer(),
        # train/train_b.py and train/train_c.py: the 700M Stage B and the 1B Stage C ("lite")
        "stage_b_lite": lambda: sb(c_hidden=[320, 576, 1152, 1152], nhead=[-1, 9, 18, 18],
                                   blocks=[[2, 4, 14, 4], [4, 14, 4, 2]], block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]]),
        "stage_b_large": lambda: sb(),
        "stage_c_lite": lambda: sc(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]]),
        "stage_c_large": lambda: sc(),
    }
    return {"official_keys.json.gz": {name: _meta_keys(build) for name, build in builders.items()}}


def controlnet(off: types.SimpleNamespace) -> dict[str, Any]:
    """ControlNet: filters (canny, inpaint + saliency, super-resolution), the four bottlenecks, Stage C with features."""
    import cv2

    cn, sal = off.controlnet, off.saliency_model
    out: dict[str, torch.Tensor] = {}

    def net(**kw: Any) -> torch.nn.Module:
        model = fill_(cn.ControlNet(**kw))
        if kw.get("bottleneck_mode") in (None, "effnet"):
            bn1_(model)
        return model.eval()

    with torch.no_grad():
        # canny: a blocky image (nearest-upsampled noise) has edges
        low = torch.rand(2, 3, 12, 10, generator=_gen(1))
        image = F.interpolate(low, size=(96, 80), mode="nearest")
        edges = cn.CannyFilter("cpu", resize=224)(image)
        model = net(c_in=1, c_proj=64, proj_blocks=[0, 3, 9])
        canny = model(edges)
        out |= {"canny.image": image, "canny.edges": edges, "canny.stem": model.backbone[0](edges)}
        out |= _outputs("canny.out", canny)

        # Stage C with the canny features, at half strength, and without
        stage_c = fill_(off.stage_c.StageC(**TINY_STAGE_C_CONFIG)).eval()
        g = _gen(1)
        inputs = {"x": torch.randn(2, 16, 6, 5, generator=g), "clip_text": torch.randn(2, 7, 32, generator=g),
                  "clip_text_pooled": torch.randn(2, 1, 32, generator=g),
                  "clip_img": torch.randn(2, 1, 24, generator=g), "r": torch.tensor([0.2, 0.7])}
        out |= {f"stagec.{k}": v for k, v in inputs.items()}
        out["stagec.out"] = stage_c(**inputs, cnet=canny)
        out["stagec.out_half"] = stage_c(**inputs, cnet=[None if c is None else c * 0.5 for c in canny])
        out["stagec.out_none"] = stage_c(**inputs)

        saliency = fill_(sal.MicroResNet()).eval()
        x = torch.rand(1, 3, 64, 48, generator=_gen(1))
        out |= {"saliency.x": x, "saliency.out": saliency(x)}

        # inpainting: the official filter with the filled saliency model (its constructor loads a file)
        small = torch.rand(1, 3, 4, 3, generator=_gen(1))
        image = F.interpolate(small, size=(192, 160), mode="bicubic").clamp(0, 1)
        import torchvision

        resized = torchvision.transforms.functional.resize(image, 240, antialias=True)
        threshold = round(float(saliency(resized).median()), 3)
        inpaint = cn.InpaintFilter.__new__(cn.InpaintFilter)
        inpaint.device, inpaint.saliency_model, inpaint.thresold, inpaint.p_outpaint = "cpu", saliency, [0.04, 0.4], 0.4
        user_mask = torch.rand(1, 1, 192, 160, generator=_gen(2)) > 0.7
        hint = inpaint(image, threshold=threshold, outpaint=False)
        out |= {"inpaint.image": image, "inpaint.threshold": torch.tensor([threshold]), "inpaint.in": hint,
                "inpaint.out_in": inpaint(image, threshold=threshold, outpaint=True),
                "inpaint.user_mask": user_mask.float(), "inpaint.user_in": inpaint(image, mask=user_mask)}
        out |= _outputs("inpaint.out", net(c_in=4, c_proj=64, proj_blocks=[1, 4])(hint))

        x = torch.rand(1, 3, 64, 64, generator=_gen(1))
        out |= {"rgb.x": x} | _outputs("rgb.out", net(c_in=3, c_proj=32, proj_blocks=[2])(x))
        x = torch.randn(2, 8, 5, 4, generator=_gen(1))
        out |= {"simple.x": x} | _outputs("simple.out", net(c_in=8, c_proj=32, proj_blocks=[0, 1, 2],
                                                             bottleneck_mode="simple")(x))

        # super-resolution: the official filter with a filled (bn1) encoder (its constructor loads a file)
        sr = cn.SREffnetFilter.__new__(cn.SREffnetFilter)
        sr.device, sr.scale_factor = "cpu", 0.5
        sr.effnet_preprocess = torchvision.transforms.Compose([torchvision.transforms.Normalize(*IMAGENET)])
        sr.effnet = fill_(off.effnet.EfficientNetEncoder())
        bn1_(sr.effnet)
        sr.effnet.eval()
        x = torch.rand(1, 3, 128, 96, generator=_gen(1))
        latent, upscaled = sr(x)
        out |= {"sr.x": x, "sr.latent": latent, "sr.image": upscaled}

        x = torch.randn(1, 16, 3, 2, generator=_gen(1))
        out |= {"large.x": x} | _outputs("large.out", net(c_in=16, c_proj=64, proj_blocks=[0, 2],
                                                           bottleneck_mode="large")(x))

    blocks = [0, 4, 8, 12, 51, 55, 59, 63]  # configs/inference/controlnet_c_3b_*.yaml
    keys = {
        "canny": _meta_keys(lambda: cn.ControlNet(c_in=1, proj_blocks=blocks)),
        "inpainting": _meta_keys(lambda: cn.ControlNet(c_in=4, proj_blocks=blocks)),
        "super_resolution": _meta_keys(lambda: cn.ControlNet(c_in=16, proj_blocks=blocks, bottleneck_mode="large")),
        "identity": _meta_keys(lambda: cn.ControlNet(c_in=512, proj_blocks=list(range(64)),
                                                     bottleneck_mode="simple")),
        "saliency": _meta_keys(lambda: sal.MicroResNet()),
    }
    return {"golden_controlnet.safetensors": out, "controlnet_official_keys.json.gz": keys,
            "_versions": {"opencv": cv2.__version__}}


BUILDERS: dict[str, Callable[[types.SimpleNamespace], dict[str, Any]]] = {
    "stage_b": stage_b, "stage_c": stage_c, "stage_a": stage_a, "effnet": effnet, "previewer": previewer,
    "sampler": sampler, "official_keys": official_keys, "controlnet": controlnet,
}
SEEDS = {
    "stage_b": "weights: fill rule, seed 0; inputs: Generator().manual_seed(1) per case (x, effnet, clip, pixels)",
    "stage_c": "weights: fill rule, seed 0; inputs: Generator().manual_seed(1); cnet: Generator().manual_seed(2)",
    "stage_a": "weights: fill rule, seed 0; x: Generator().manual_seed(1)",
    "effnet": "weights: fill rule, seed 0 (bn1.*: then BatchNorm weight += 1); inputs: Generator().manual_seed(1)",
    "previewer": "weights: fill rule, seed 0; x: Generator().manual_seed(1)",
    "sampler": "x_init: Generator().manual_seed(0); DDPM cases: torch.manual_seed(seed) of the case",
    "official_keys": "none (meta device)",
    "controlnet": "weights: fill rule, seed 0 (+bn1 for EfficientNet backbones); inputs: Generator().manual_seed(1) "
                  "per case, inpaint.user_mask: Generator().manual_seed(2)",
}


# --------------------------------------------------------------------------------------------- writing, checking

def versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Library versions the goldens were computed with."""
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, **(extra or {})}


def provenance(name: str, off: types.SimpleNamespace, extra: dict[str, str]) -> dict[str, str]:
    """What a golden records about itself."""
    return {"generator": f"python tests/make_goldens.py --official DIR --only {name}",
            "source": f"{OFFICIAL_REPO} at {off.commit} (official code, CPU fp32 eval, no_grad; stand-ins as in "
                      "tests/make_goldens.py and tests/data/README.md)",
            "seeds": SEEDS[name], "versions": json.dumps(versions(extra), sort_keys=True)}


JSON_INDENT = {"stage_b_tiny_keys.json": 0, "stage_c_tiny_keys.json": 0, "golden_sampler_settings.json": 1}


def encode(path: str, content: Any) -> bytes:
    """The bytes of one golden JSON file in its stored layout (``.gz``: compact, gzip without a timestamp)."""
    data = json.dumps(content, indent=JSON_INDENT.get(path)).encode()
    return gzip.compress(data, mtime=0) if path.endswith(".gz") else data


def compare(path: Path, content: Any) -> list[str]:
    """Differences between a regenerated golden and the stored file (empty: the same)."""
    if not path.is_file():
        return [f"{path.name}: not stored yet"]
    if path.suffix == ".safetensors":
        stored = load_file(str(path))
        lines = []
        if set(stored) != set(content):
            lines.append(f"{path.name}: keys differ: only stored {sorted(set(stored) - set(content))[:5]}, only new "
                         f"{sorted(set(content) - set(stored))[:5]}")
        worst, name = 0.0, ""
        for k in sorted(set(stored) & set(content)):
            a, b = stored[k], content[k].contiguous()
            if a.shape != b.shape or a.dtype != b.dtype:
                lines.append(f"{path.name}: {k}: {a.dtype}{list(a.shape)} stored, {b.dtype}{list(b.shape)} now")
                continue
            if not torch.equal(a, b):
                scale = max(a.abs().max().item(), 1e-30) if a.is_floating_point() else 1.0
                err = (a.double() - b.double()).abs().max().item() / scale
                if err > worst:
                    worst, name = err, k
        if worst:
            lines.append(f"{path.name}: largest difference {worst:.2e} × max|stored| ({name})")
        return lines
    raw = path.read_bytes()
    stored = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    return [] if _close(stored, json.loads(json.dumps(content))) else [f"{path.name}: JSON content differs"]


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6,
                                                                                            abs_tol=1e-6)
    return a == b


def main() -> None:
    """Regenerate, check or write the goldens (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=Path, help=f"checkout of {OFFICIAL_REPO} at {OFFICIAL_COMMIT}")
    parser.add_argument("--out", type=Path, default=DATA, help="where to write (default: tests/data)")
    parser.add_argument("--only", default=",".join(BUILDERS), help="comma-separated builders: " + ",".join(BUILDERS))
    parser.add_argument("--check", action="store_true", help="compare with the stored goldens and write nothing")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise SystemExit(f"unknown builders {unknown}; choose from {', '.join(BUILDERS)}")
    torch.set_num_threads(2)  # the thread count the stored goldens were computed with
    off = import_official(args.official)
    if not off.commit.startswith(OFFICIAL_COMMIT):
        print(f"warning: {args.official} is at {off.commit}, not {OFFICIAL_COMMIT}; the goldens may differ")
    manifest_path = args.out / "GOLDENS.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    problems = []
    for name in names:
        files = BUILDERS[name](off)
        extra = files.pop("_versions", {})
        meta = provenance(name, off, extra)
        for file, content in files.items():
            path = args.out / file
            if args.check:
                diff = compare(DATA / file, content)
                problems += diff
                print(f"{file}: {'identical' if not diff else '; '.join(diff)}")
                continue
            args.out.mkdir(parents=True, exist_ok=True)
            if file.endswith(".safetensors"):
                save_file({k: v.contiguous() for k, v in content.items()}, str(path), metadata=meta)
            else:
                path.write_bytes(encode(file, content))
            manifest[file] = {**meta, "versions": json.loads(meta["versions"]),
                              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            print(f"wrote {path}")
    if not args.check:
        manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
        print(f"wrote {manifest_path}")
    elif problems:
        print(f"{len(problems)} difference(s): see above (float-level ones come from other library versions)")


if __name__ == "__main__":
    main()
