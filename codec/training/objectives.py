"""Loss weights and noise shapes of the official training (GDF, official.md §11.2, §13.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diffusion import p2_loss_weight


class AdaptiveLossWeight:
    """Official ``AdaptiveLossWeight``: weight = 1 / running loss of the sample's logSNR bucket.

    300 buckets split by ``linspace(-10, 10, 299)``; losses start at 1 and are updated per
    sample with ``β = 0.99`` (vectorised assignment: within one batch the last sample of a
    bucket wins, as official). Weights are clamped to ``[1e-7, 1e7]``.
    """

    def __init__(self, logsnr_range: tuple[float, float] = (-10.0, 10.0), buckets: int = 300,
                 weight_range: tuple[float, float] = (1e-7, 1e7)):
        self.bucket_ranges = torch.linspace(logsnr_range[0], logsnr_range[1], buckets - 1)
        self.bucket_losses = torch.ones(buckets)
        self.weight_range = weight_range

    def _index(self, logsnr: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.bucket_ranges, logsnr.detach().float().cpu())

    def __call__(self, logsnr: torch.Tensor) -> torch.Tensor:
        w = 1 / self.bucket_losses[self._index(logsnr)]
        return w.clamp(*self.weight_range).to(logsnr.device)

    def update(self, logsnr: torch.Tensor, loss: torch.Tensor, beta: float = 0.99) -> None:
        """Move the buckets of ``logsnr`` towards the per-sample ``loss`` (both in global batch order)."""
        idx = self._index(logsnr)
        self.bucket_losses[idx] = self.bucket_losses[idx] * beta + loss.detach().float().cpu() * (1 - beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Bucket edges and running losses (saved in checkpoints)."""
        return {"bucket_ranges": self.bucket_ranges.clone(), "bucket_losses": self.bucket_losses.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        self.bucket_ranges = state["bucket_ranges"].clone()
        self.bucket_losses = state["bucket_losses"].clone()


class P2LossWeight:
    """Official default ``P2LossWeight``: ``1 / (1 + SNR)``."""

    def __call__(self, logsnr: torch.Tensor) -> torch.Tensor:
        return p2_loss_weight(logsnr)

    def update(self, logsnr: torch.Tensor, loss: torch.Tensor) -> None:
        """Nothing to learn."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """No state."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """No state."""


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator | None = None,
                  size_range: tuple[int, int] = (1, 16), levels: int = 10) -> torch.Tensor:
    """Official Stage B pyramid noise on ``(B,C,H,W)`` noise: add nearest-upsampled coarse noise.

    Level i (1…levels−1) has side ``H // 2^i`` for *both* dimensions (the official code uses
    the height twice), weight ``0.75^i``, and is used only when its side lies in
    ``size_range``; the loop stops after a side ≤ 1. The sum is divided by
    ``sqrt(Σ weight²)`` (weight 1 for the base noise). Coarse noise is drawn on the CPU
    from ``generator`` in level order.
    """
    out = noise.clone()
    weights = [1.0]
    for i in range(1, levels):
        m = 0.75 ** i
        side = noise.size(-2) // (2 ** i)
        if size_range[0] <= side <= size_range[1]:
            coarse = torch.randn(noise.size(0), noise.size(1), side, side, generator=generator).to(noise)
            out = out + F.interpolate(coarse, size=noise.shape[-2:], mode="nearest") * m
            weights.append(m)
        if side <= 1:
            break
    return out / sum(w * w for w in weights) ** 0.5


def loss_weight(kind: str) -> AdaptiveLossWeight | P2LossWeight:
    """``"p2"`` or ``"adaptive"``."""
    return AdaptiveLossWeight() if kind == "adaptive" else P2LossWeight()


def pyramid_noise_per_sample(x0: torch.Tensor, rand) -> torch.Tensor:
    """Pyramid noise like ``x0``, each sample drawn from its own generator of ``rand`` (a :class:`~.rng.BatchRandom`),
    so that it does not depend on how the batch is split between processes."""
    return torch.cat([pyramid_noise(torch.randn(1, *x0.shape[1:], generator=g), generator=g)
                      for g in rand.samples]).to(x0.dtype)
