"""Previewer: a small conv net that turns a 16×h×w Stage C latent into a 3×8h×8w RGB preview."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PreviewerConfig:
    """Hyper-parameters of :class:`Previewer` (official names; defaults = the released model)."""

    c_in: int = 16
    c_hidden: int = 512
    c_out: int = 3


class Previewer(nn.Module):
    """Official ``Previewer`` (same keys): Conv → GELU → BatchNorm stacks with three ×2 transposed convs."""

    def __init__(self, c_in: int = 16, c_hidden: int = 512, c_out: int = 3):
        super().__init__()

        def stage(conv: nn.Module, c: int) -> list[nn.Module]:
            return [conv, nn.GELU(), nn.BatchNorm2d(c)]

        h = c_hidden
        self.blocks = nn.Sequential(
            *stage(nn.Conv2d(c_in, h, kernel_size=1), h),
            *stage(nn.Conv2d(h, h, kernel_size=3, padding=1), h),
            *stage(nn.ConvTranspose2d(h, h // 2, kernel_size=2, stride=2), h // 2),
            *stage(nn.Conv2d(h // 2, h // 2, kernel_size=3, padding=1), h // 2),
            *stage(nn.ConvTranspose2d(h // 2, h // 4, kernel_size=2, stride=2), h // 4),
            *stage(nn.Conv2d(h // 4, h // 4, kernel_size=3, padding=1), h // 4),
            *stage(nn.ConvTranspose2d(h // 4, h // 4, kernel_size=2, stride=2), h // 4),
            *stage(nn.Conv2d(h // 4, h // 4, kernel_size=3, padding=1), h // 4),
            nn.Conv2d(h // 4, c_out, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Latent ``(B,16,h,w)`` → RGB preview ``(B,3,8h,8w)``, roughly in [0,1] (not clamped)."""
        return self.blocks(x)
