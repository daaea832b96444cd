"""Stage B: the diffusion decoder that denoises Stage A latents conditioned on EfficientNet latents.

Constructor arguments and state-dict keys are those of the official ``StageB``; the
released ``stage_b*.safetensors`` files load with ``strict=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import CascadeUNet, LayerNorm2d, autocast_for, init_cascade_weights, patch_embedding, patch_head


@dataclass(frozen=True)
class StageBConfig:
    """Hyper-parameters of :class:`StageB` (official names and defaults = the large model)."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1280
    c_hidden: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    nhead: list = field(default_factory=lambda: [-1, -1, 20, 20])
    blocks: list = field(default_factory=lambda: [[2, 6, 28, 6], [6, 28, 6, 2]])
    block_repeat: list = field(default_factory=lambda: [[1, 1, 1, 1], [3, 3, 2, 2]])
    level_config: list = field(default_factory=lambda: ["CT", "CT", "CTA", "CTA"])
    c_clip: int = 1280
    c_clip_seq: int = 4
    c_effnet: int = 16
    c_pixels: int = 3
    kernel_size: int = 3
    dropout: list = field(default_factory=lambda: [0, 0, 0.1, 0.1])
    self_attn: bool = True
    t_conds: list = field(default_factory=lambda: ["sca"])


def _mapper(c_in: int, c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c * 4, kernel_size=1), nn.GELU(), nn.Conv2d(c * 4, c, kernel_size=1),
        LayerNorm2d(c, elementwise_affine=False, eps=1e-6),
    )


class StageB(CascadeUNet):
    """Stage B U-Net: predicts the noise in a (scaled) Stage A latent.

    ``forward(x, r, effnet, clip, pixels=None)``: ``x`` ``(B,4,H,W)`` noised Stage A
    latent, ``r`` ``(B,)`` noise condition, ``effnet`` ``(B,16,h,w)`` EfficientNet
    latent (any size; resized to the working resolution), ``clip`` pooled CLIP-G text
    ``(B,1,1280)`` or ``(B,1280)``, ``pixels`` ``(B,3,h,w)`` (zeros by default).
    """

    def __init__(self, c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1280, c_hidden=(320, 640, 1280, 1280),
                 nhead=(-1, -1, 20, 20), blocks=((2, 6, 28, 6), (6, 28, 6, 2)),
                 block_repeat=((1, 1, 1, 1), (3, 3, 2, 2)), level_config=("CT", "CT", "CTA", "CTA"), c_clip=1280,
                 c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3, dropout=(0, 0, 0.1, 0.1), self_attn=True,
                 t_conds=("sca",)):
        super().__init__()
        self.config = StageBConfig(c_in, c_out, c_r, patch_size, c_cond, list(c_hidden), list(nhead),
                                   [list(b) for b in blocks], [list(b) for b in block_repeat], list(level_config),
                                   c_clip, c_clip_seq, c_effnet, c_pixels, kernel_size,
                                   list(dropout) if isinstance(dropout, (list, tuple)) else dropout,
                                   self_attn, list(t_conds))
        self.c_r = c_r
        self.t_conds = list(t_conds)
        self.c_clip_seq = c_clip_seq
        n = len(c_hidden)
        dropout = list(dropout) if isinstance(dropout, (list, tuple)) else [dropout] * n
        self_attn = list(self_attn) if isinstance(self_attn, (list, tuple)) else [self_attn] * n

        self.effnet_mapper = _mapper(c_effnet, c_hidden[0])
        self.pixels_mapper = _mapper(c_pixels, c_hidden[0])
        self.clip_mapper = nn.Linear(c_clip, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = patch_embedding(c_in, c_hidden[0], patch_size)
        self.build_levels(c_hidden, c_cond, nhead, c_r, blocks, block_repeat, level_config, kernel_size, dropout,
                          self_attn, lambda c_in, c_out, mode, i: (
                              nn.Conv2d(c_in, c_out, kernel_size=2, stride=2) if mode == "down"
                              else nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)))
        self.clf = patch_head(c_hidden[0], c_out, patch_size)

    def init_weights(self) -> None:
        """The official training initialisation (only needed when training from scratch)."""
        init_cascade_weights(self, sum(self.config.blocks[0]))
        for m in (self.clip_mapper, self.effnet_mapper[0], self.effnet_mapper[2],
                  self.pixels_mapper[0], self.pixels_mapper[2]):
            nn.init.normal_(m.weight, std=0.02)

    def embed_clip(self, clip: torch.Tensor) -> torch.Tensor:
        """Pooled text ``(B,1,c_clip)`` or ``(B,c_clip)`` → ``c_clip_seq`` normalised condition tokens."""
        if clip.ndim == 2:
            clip = clip.unsqueeze(1)
        clip = self.clip_mapper(clip).view(clip.size(0), clip.size(1) * self.c_clip_seq, -1)
        return self.clip_norm(clip)

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor,
                pixels: torch.Tensor | None = None, **kwargs: torch.Tensor) -> torch.Tensor:
        """Predict the noise ``(B, c_out, H, W)``; extra keyword tensors are the ``t_conds`` (e.g. ``sca``)."""
        with autocast_for(self, x.device):
            if pixels is None:
                pixels = x.new_zeros(x.size(0), 3, 8, 8)
            r_embed = self.embed_r(r, kwargs)
            clip = self.embed_clip(clip)
            h = self.embedding(x)
            size = h.shape[-2:]
            h = h + self.effnet_mapper(F.interpolate(effnet.float(), size=size, mode="bilinear", align_corners=True))
            h = h + F.interpolate(self.pixels_mapper(pixels).float(), size=size, mode="bilinear", align_corners=True)
            return self.clf(self.run_unet(h, r_embed, clip))

