"""Diffusion maths of Stable Cascade: cosine schedule, VP scaling, epsilon target, samplers, CFG.

This reproduces the semantics of the official ``gdf`` package as configured by every
released model (``CosineSchedule(clamp_range=[1e-4, 0.9999])``, ``VPScaler``,
``EpsilonTarget``, ``CosineTNoiseCond``), including its quirks:

* ``shift`` lowers the logSNR by ``2 ln shift`` and the result is then clipped to the
  *unshifted* limits ``[λ(1), λ(0)]``;
* the model is conditioned on ``noise_condition(λ)`` (the t of the unshifted schedule
  that gives the same λ), so t = 1 maps to 0.99358, not 1;
* classifier-free guidance rescales the guided ε with ``cfg_rho`` (0.7 by default),
  using the standard deviation over the *whole* batch tensor;
* sampling returns the x0 prediction of the last step, not the sampler's x.

Random numbers: the initial noise is ``randn(shape)`` and each DDPM step draws one
more ``randn`` of the same shape, all from one CPU generator (``torch.manual_seed(seed)``
followed by the official sampler gives the same numbers). Noise is drawn on the CPU and
moved to the model's device, so a seed gives the same result on every device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = [
    "CosineSchedule", "vp_scalers", "noise_condition", "p2_loss_weight", "diffuse", "sample",
    "SAMPLERS", "PREDICTIONS",
]

SAMPLERS = ("ddpm", "ddim")
PREDICTIONS = ("epsilon", "v")  # what a denoiser outputs: the official models epsilon, the built-in mini codec v


class CosineSchedule:
    """The improved-DDPM cosine schedule as logSNR, with the official clamping and shift."""

    def __init__(self, s: float = 0.008, clamp_range: Sequence[float] = (1e-4, 0.9999)):
        self.s = torch.tensor([s])
        self.clamp_range = tuple(clamp_range)
        self.min_var = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2
        self.limits = self(torch.tensor([1.0, 0.0])).tolist()

    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        s, min_var = self.s.to(t.device), self.min_var.to(t.device)
        var = torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var
        var = var.clamp(*self.clamp_range)
        return (var / (1 - var)).log()

    def __call__(self, t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
        """logSNR at ``t`` ∈ [0,1] (1 = pure noise), shifted by ``-2 ln shift`` then clipped."""
        logsnr = self._logsnr(t.float().clamp(0, 1))
        if shift != 1:
            logsnr = logsnr + 2 * math.log(1 / shift)
        if getattr(self, "limits", None) is not None:
            logsnr = logsnr.clamp(*self.limits)
        return logsnr

    def random_t(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training t as official: ``1 - U[0,1) + 0.001`` clamped to [0.001, 1]."""
        return (1 - torch.rand(batch_size, generator=generator)).add(0.001).clamp(0.001, 1.0)


def vp_scalers(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance-preserving scales ``a = sqrt(sigmoid λ)``, ``b = sqrt(1 - a²)``."""
    a2 = logsnr.sigmoid()
    return a2.sqrt(), (1 - a2).sqrt()


def noise_condition(logsnr: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Inverse of the unshifted cosine schedule: the t the model is conditioned on."""
    st = torch.tensor([s], device=logsnr.device)
    min_var = torch.cos(st / (1 + st) * torch.pi * 0.5) ** 2
    var = logsnr.sigmoid().clamp(0, 1)
    return ((var * min_var) ** 0.5).acos() / (torch.pi * 0.5) * (1 + st) - st


def p2_loss_weight(logsnr: torch.Tensor, k: float = 1.0, gamma: float = 1.0, s: float = 1.0) -> torch.Tensor:
    """P2 loss weight ``(k + e^{sλ})^{-γ}`` (= 1/(1+SNR) with the defaults)."""
    return (k + (logsnr * s).exp()) ** -gamma


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (like.ndim - 1)) if v.ndim == 1 else v


def diffuse(x0: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor | None = None, shift: float = 1.0,
            schedule: CosineSchedule | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise ``x0`` to time ``t``; returns ``(x_t, noise, logsnr, noise_condition)``.

    The official image-to-image recipe noises with ``shift=1`` even when it then samples
    with shift 2; pass ``shift`` explicitly to choose.
    """
    schedule = schedule or CosineSchedule()
    if not torch.is_tensor(t):
        t = torch.full((x0.size(0),), float(t))
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    logsnr = schedule(t, shift=shift).to(x0.device)
    a, b = vp_scalers(logsnr)
    return x0 * _bcast(a, x0) + noise * _bcast(b, x0), noise, logsnr, noise_condition(logsnr)


def _concat_inputs(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    if set(cond) != set(uncond):
        raise ValueError(f"conditional inputs {sorted(cond)} and unconditional inputs {sorted(uncond)} "
                         "must have the same keys")
    out: dict[str, Any] = {}
    for key, v in cond.items():
        u = uncond[key]
        if torch.is_tensor(v):
            out[key] = torch.cat([v, u.to(v.device, v.dtype)], dim=0)
        elif isinstance(v, (list, tuple)):
            out[key] = [torch.cat([a, b], dim=0) if torch.is_tensor(a) and torch.is_tensor(b) else None
                        for a, b in zip(v, u)]
        else:
            out[key] = v
    return out


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def sample(model: Callable[..., torch.Tensor], cond: Mapping[str, Any], shape: Sequence[int] | None = None,
           uncond: Mapping[str, Any] | None = None, steps: int = 20, cfg: float | Sequence[float] | None = None,
           cfg_rho: float = 0.7, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0,
           sampler: str = "ddpm", eta: float | None = None, x_init: torch.Tensor | None = None,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           cfg_t_stop: float | None = None, cfg_t_start: float | None = None,
           schedule: CosineSchedule | None = None, callback: StepCallback | None = None,
           x0_clamp: float | None = None, prediction: str = "epsilon", grad: bool = False) -> torch.Tensor:
    """Run the official sampler and return the last step's x0 prediction (fp32).

    ``model(x, r, **inputs)`` predicts epsilon (or v, with ``prediction="v"``; not official: the built-in
    ``mini`` codec's Stage B, where v = a·ε − b·x0 on the VP path x = a·x0 + b·ε). ``cond``/``uncond`` are the model's
    keyword inputs; with ``cfg`` set and ``uncond`` omitted the unconditional inputs are
    zeros (official default). ``cfg`` may be a pair ``(at_t_start, at_t_end)`` lerped
    over t. ``sampler`` is ``"ddpm"`` (eta 1, official default) or ``"ddim"`` (eta 0);
    ``eta`` overrides. ``x_init`` starts from a given noised latent (image-to-image with
    ``t_start`` < 1); otherwise ``shape`` gives the noise shape. ``generator`` is a CPU
    generator; ``None`` uses torch's global CPU generator exactly as the official code.
    ``callback(step, x0, x)`` sees every step (e.g. for previews). ``x0_clamp`` (not official; off by
    default) clips each step's x0 prediction to ±``x0_clamp`` and re-derives epsilon from it, as the
    original DDPM sampler clips images to [-1, 1]: it keeps an under-trained model's first, high-noise
    steps (x0 = (x − b·ε)/a with a ≈ 0.01) from blowing up (used by the small built-in ``mini`` codec).
    ``grad``: keep the autograd graph (training through the sampler); off, it runs under ``no_grad``.
    """
    with torch.set_grad_enabled(grad):
        return _sample(model, cond, shape, uncond, steps, cfg, cfg_rho, shift, t_start, t_end, sampler, eta, x_init,
                       generator, device, cfg_t_stop, cfg_t_start, schedule, callback, x0_clamp, prediction)


def _sample(model, cond, shape, uncond, steps, cfg, cfg_rho, shift, t_start, t_end, sampler, eta, x_init, generator,
            device, cfg_t_stop, cfg_t_start, schedule, callback, x0_clamp, prediction) -> torch.Tensor:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction {prediction!r} is not one of {PREDICTIONS}")
    eta = (1.0 if sampler == "ddpm" else 0.0) if eta is None else float(eta)
    schedule = schedule or CosineSchedule()
    device = torch.device(device)

    r_range = torch.linspace(t_start, t_end, steps + 1)
    if x_init is None:
        if shape is None:
            raise ValueError("give either shape or x_init")
        x = torch.randn(*shape, generator=generator).to(device)
    else:
        x = x_init.detach().float().clone().to(device)
    batch = x.size(0)
    logsnrs = schedule(r_range, shift=shift)[:, None].expand(-1, batch).to(device)

    use_cfg = cfg is not None and not (isinstance(cfg, (int, float)) and cfg == 1)
    both = None
    if use_cfg:
        if uncond is None:
            uncond = {k: (torch.zeros_like(v) if torch.is_tensor(v) else v) for k, v in cond.items()}
        both = _concat_inputs(cond, uncond)

    x0 = x
    for i in range(steps):
        r_i = r_range[i].item()
        nc = noise_condition(logsnrs[i])
        guided = use_cfg and (cfg_t_stop is None or r_i >= cfg_t_stop) and (cfg_t_start is None or r_i <= cfg_t_start)
        if guided:
            scale = cfg
            if isinstance(scale, (list, tuple)):
                if len(scale) != 2:
                    raise ValueError(f"cfg must be a number or a pair, got {cfg!r}")
                scale = scale[0] * r_i + scale[1] * (1 - r_i)
            pred_c, pred_u = model(torch.cat([x, x], dim=0), nc.repeat(2), **both).float().chunk(2)
            pred = torch.lerp(pred_u, pred_c, scale)
            if cfg_rho > 0:
                pred = cfg_rho * (pred * pred_c.std() / (pred.std() + 1e-9)) + pred * (1 - cfg_rho)
        else:
            pred = model(x, nc, **cond).float()

        a, b = vp_scalers(logsnrs[i])
        a, b = _bcast(a, x), _bcast(b, x)
        if prediction == "v":
            x0, pred = a * x - b * pred, b * x + a * pred  # v → x0 and epsilon
        else:
            x0 = (x - pred * b) / a
        if x0_clamp is not None:
            x0 = x0.clamp(-x0_clamp, x0_clamp)
            pred = (x - a * x0) / b
        a_prev, b_prev = vp_scalers(logsnrs[i + 1])
        a_prev, b_prev = _bcast(a_prev, x), _bcast(b_prev, x)
        if eta > 0:
            sigma = eta * (b_prev**2 / b**2).sqrt() * (1 - a**2 / a_prev**2).sqrt()
            noise = torch.randn(x.shape, generator=generator).to(device)
            x = a_prev * x0 + (b_prev**2 - sigma**2).sqrt() * pred + sigma * noise
        else:
            x = a_prev * x0 + (b_prev**2).sqrt() * pred
        if callback is not None:
            callback(i, x0, x)
    return x0
