"""Stage A: the f4 VQGAN-style autoencoder (official ``StageA``, same keys and hyper-parameters).

At inference the codec uses the *unquantised* encoder output divided by
``scale_factor`` (0.43 for the released ``stage_a.safetensors``); the codebook is kept
for training and for users who want discrete tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class MixingResBlock(nn.Module):
    """Stage A residual block: gated depthwise conv then gated MLP, both on channel-LayerNormed input.

    Six learned scalars ``gammas`` set the scale/shift of each norm and each branch's gain.
    """

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With channels_last input every permute below is a free view (see StageA.decode).
        g = self.gammas
        h = torch.addcmul(g[1], self.norm1(x.permute(0, 2, 3, 1)), 1 + g[0]).permute(0, 3, 1, 2)
        x = torch.addcmul(x, self.depthwise(h), g[2])
        h = torch.addcmul(g[4], self.norm2(x.permute(0, 2, 3, 1)), 1 + g[3])
        return torch.addcmul(x, self.channelwise(h).permute(0, 3, 1, 2), g[5])


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantiser with a straight-through gradient (torchtools ``VectorQuantize`` semantics)."""

    def __init__(self, embedding_size: int, k: int):
        super().__init__()
        self.codebook = nn.Embedding(k, embedding_size)
        self.codebook.weight.data.uniform_(-1 / k, 1 / k)

    def forward(self, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise along ``dim``; returns ``(quantised_straight_through, indices, vq_loss, commit_loss)``."""
        x = x.movedim(dim, -1)
        flat = x.reshape(-1, x.size(-1))
        cb = self.codebook.weight
        dist = torch.addmm((cb * cb).sum(1)[None, :] + (flat * flat).sum(1, keepdim=True), flat, cb.t(), alpha=-2)
        indices = dist.argmin(dim=-1)
        zq = self.codebook(indices).view_as(x)
        vq_loss = F.mse_loss(zq, x.detach())
        commit_loss = F.mse_loss(x, zq.detach())
        zq = x + (zq - x).detach()
        return zq.movedim(-1, dim), indices.view(x.shape[:-1]), vq_loss, commit_loss


class QuantizedLatent(NamedTuple):
    """Result of :meth:`StageA.encode_quantized`; every latent already divided by ``scale_factor``."""

    quantized: torch.Tensor
    latent: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor


@dataclass(frozen=True)
class StageAConfig:
    """Hyper-parameters of :class:`StageA` (official names; defaults = the released model)."""

    levels: int = 2
    bottleneck_blocks: int = 12
    c_hidden: int = 384
    c_latent: int = 4
    codebook_size: int = 8192
    scale_factor: float = 0.43


class StageA(nn.Module):
    """Stage A autoencoder: RGB in [0,1] ``(B,3,H,W)`` ↔ latent ``(B,c_latent,H/4,W/4)``."""

    def __init__(self, levels: int = 2, bottleneck_blocks: int = 12, c_hidden: int = 384, c_latent: int = 4,
                 codebook_size: int = 8192, scale_factor: float = 0.43):
        super().__init__()
        self.c_latent = c_latent
        self.scale_factor = scale_factor
        self.config = dict(levels=levels, bottleneck_blocks=bottleneck_blocks, c_hidden=c_hidden,
                           c_latent=c_latent, codebook_size=codebook_size, scale_factor=scale_factor)
        c_levels = [c_hidden // (2**i) for i in reversed(range(levels))]

        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down: list[nn.Module] = []
        for i in range(levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(MixingResBlock(c_levels[i], c_levels[i] * 4))
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(c_latent)))
        self.down_blocks = nn.Sequential(*down)
        self.codebook_size = codebook_size
        self.vquantizer = VectorQuantizer(c_latent, k=codebook_size)

        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
        for i in range(levels):
            c = c_levels[levels - 1 - i]
            up.extend(MixingResBlock(c, c * 4) for _ in range(bottleneck_blocks if i == 0 else 1))
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unquantised latent divided by ``scale_factor`` (what Stage B was trained on)."""
        x = x.contiguous(memory_format=torch.channels_last)
        return (self.down_blocks(self.in_block(x)) / self.scale_factor).contiguous()

    def encode_quantized(self, x: torch.Tensor) -> QuantizedLatent:
        """Encode and vector-quantise; ``loss`` = vq loss + 0.25 · commitment loss (official weighting)."""
        z = self.down_blocks(self.in_block(x))
        zq, indices, vq_loss, commit_loss = self.vquantizer(z, dim=1)
        return QuantizedLatent(zq / self.scale_factor, z / self.scale_factor, indices, vq_loss + 0.25 * commit_loss)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (scaled, as returned by :meth:`encode`) → RGB, roughly in [0,1] (not clamped)."""
        # channels_last makes the blocks' NHWC LayerNorms and MLPs copy-free (~30% faster on CPU).
        z = (z * self.scale_factor).contiguous(memory_format=torch.channels_last)
        return self.out_block(self.up_blocks(z)).contiguous()

    def forward(self, x: torch.Tensor, quantize: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Autoencode ``x``; returns ``(reconstruction, vq_loss or None)``."""
        if quantize:
            q = self.encode_quantized(x)
            return self.decode(q.quantized), q.loss
        return self.decode(self.encode(x)), None
