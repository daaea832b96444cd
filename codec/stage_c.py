"""Stage C: the text-conditional prior that generates EfficientNet latents (16×24×24 for 1024²).

Constructor arguments and state-dict keys are those of the official ``StageC``; the
released ``stage_c*.safetensors`` files load with ``strict=True``. With the released
``switch_level=[False]`` the two levels work at the same resolution: the "down" and
"up" scalers are a LayerNorm and a 1×1 convolution.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .blocks import CascadeUNet, autocast_for, init_cascade_weights, patch_embedding, patch_head
from .fp16 import check_plain_fp16_output, make_half_safe


@dataclass(frozen=True)
class StageCConfig:
    """Hyper-parameters of :class:`StageC` (official names and defaults = the 3.6B model)."""

    c_in: int = 16
    c_out: int = 16
    c_r: int = 64
    patch_size: int = 1
    c_cond: int = 2048
    c_hidden: list = field(default_factory=lambda: [2048, 2048])
    nhead: list = field(default_factory=lambda: [32, 32])
    blocks: list = field(default_factory=lambda: [[8, 24], [24, 8]])
    block_repeat: list = field(default_factory=lambda: [[1, 1], [1, 1]])
    level_config: list = field(default_factory=lambda: ["CTA", "CTA"])
    c_clip_text: int = 1280
    c_clip_text_pooled: int = 1280
    c_clip_img: int = 768
    c_clip_seq: int = 4
    kernel_size: int = 3
    dropout: list = field(default_factory=lambda: [0.1, 0.1])
    self_attn: bool = True
    t_conds: list = field(default_factory=lambda: ["sca", "crp"])
    switch_level: list = field(default_factory=lambda: [False])


class LevelScaler(nn.Module):
    """The official ``UpDownBlock2d``: a 1×1 convolution and (when ``enabled``) a 2× bilinear resize.

    Down-scaling maps then shrinks, up-scaling grows then maps; parameters sit at
    ``blocks.0`` (down) or ``blocks.1`` (up), as in the released files. It runs in fp32,
    like the official module.
    """

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        resize = (nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
                  if enabled else nn.Identity())
        mapping = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.blocks = nn.ModuleList([resize, mapping] if mode == "up" else [mapping, resize])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x.float())
        return x


class StageC(CascadeUNet):
    """Stage C U-Net: predicts the noise in an EfficientNet latent from text (and image) conditions.

    ``forward(x, r, clip_text, clip_text_pooled, clip_img, cnet=None, **t_conds)``:
    ``x`` ``(B,16,H,W)``, ``r`` ``(B,)``, ``clip_text`` ``(B,L,1280)`` CLIP-G token
    sequence, ``clip_text_pooled`` ``(B,1,1280)`` or ``(B,1280)``, ``clip_img``
    ``(B,N,768)`` or ``(B,768)`` CLIP-L image embeddings (zeros when unused), ``cnet``
    a list of ControlNet features, one entry (or ``None``) per ResBlock call in order.
    """

    def __init__(self, c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=2048, c_hidden=(2048, 2048), nhead=(32, 32),
                 blocks=((8, 24), (24, 8)), block_repeat=((1, 1), (1, 1)), level_config=("CTA", "CTA"),
                 c_clip_text=1280, c_clip_text_pooled=1280, c_clip_img=768, c_clip_seq=4, kernel_size=3,
                 dropout=(0.1, 0.1), self_attn=True, t_conds=("sca", "crp"), switch_level=(False,)):
        super().__init__()
        self.config = StageCConfig(c_in, c_out, c_r, patch_size, c_cond, list(c_hidden), list(nhead),
                                   [list(b) for b in blocks], [list(b) for b in block_repeat], list(level_config),
                                   c_clip_text, c_clip_text_pooled, c_clip_img, c_clip_seq, kernel_size,
                                   list(dropout) if isinstance(dropout, (list, tuple)) else dropout,
                                   self_attn, list(t_conds), list(switch_level))
        self.c_r = c_r
        self.t_conds = list(t_conds)
        self.c_clip_seq = c_clip_seq
        n = len(c_hidden)
        dropout = list(dropout) if isinstance(dropout, (list, tuple)) else [dropout] * n
        self_attn = list(self_attn) if isinstance(self_attn, (list, tuple)) else [self_attn] * n

        self.clip_txt_mapper = nn.Linear(c_clip_text, c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(c_clip_text_pooled, c_cond * c_clip_seq)
        self.clip_img_mapper = nn.Linear(c_clip_img, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = patch_embedding(c_in, c_hidden[0], patch_size)
        self.build_levels(c_hidden, c_cond, nhead, c_r, blocks, block_repeat, level_config, kernel_size, dropout,
                          self_attn, lambda c_in, c_out, mode, i: LevelScaler(
                              c_in, c_out, mode, enabled=switch_level[i - 1]))
        self.clf = patch_head(c_hidden[0], c_out, patch_size)

    def init_weights(self) -> None:
        """The official training initialisation (only needed when training from scratch)."""
        init_cascade_weights(self, sum(self.config.blocks[0]))
        for m in (self.clip_txt_mapper, self.clip_txt_pooled_mapper, self.clip_img_mapper):
            nn.init.normal_(m.weight, std=0.02)

    def embed_clip(self, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor,
                   clip_img: torch.Tensor) -> torch.Tensor:
        """Condition tokens ``[text (L), pooled (4), image (4·N)]``, layer-normalised: ``(B, L+4+4N, c_cond)``.

        2-D pooled and image tensors are read as one token each (the official code
        crashes on a 2-D pooled tensor).
        """
        if clip_text_pooled.ndim == 2:
            clip_text_pooled = clip_text_pooled.unsqueeze(1)
        if clip_img.ndim == 2:
            clip_img = clip_img.unsqueeze(1)
        bsz = clip_text.size(0)
        txt = self.clip_txt_mapper(clip_text)
        pooled = self.clip_txt_pooled_mapper(clip_text_pooled).view(bsz, clip_text_pooled.size(1) * self.c_clip_seq, -1)
        img = self.clip_img_mapper(clip_img).view(bsz, clip_img.size(1) * self.c_clip_seq, -1)
        return self.clip_norm(torch.cat([txt, pooled, img], dim=1))

    def forward(self, x: torch.Tensor, r: torch.Tensor, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor,
                clip_img: torch.Tensor, cnet: Sequence[torch.Tensor | None] | None = None,
                **kwargs: torch.Tensor) -> torch.Tensor:
        """Predict the noise ``(B, c_out, H, W)``; extra keyword tensors are the ``t_conds`` (``sca``, ``crp``)."""
        with autocast_for(self, x.device):
            r_embed = self.embed_r(r, kwargs)
            clip = self.embed_clip(clip_text, clip_text_pooled, clip_img)
            # ControlNet features are consumed one per ResBlock call; past the list's end they are None.
            control = None if cnet is None else itertools.chain(cnet, itertools.repeat(None))
            out = self.clf(self.run_unet(self.embedding(x), r_embed, clip, control))
        # Only plain fp16 gives an fp16 output (half_safe() computes in fp32); refuse its NaN/inf.
        return check_plain_fp16_output(out) if out.dtype == torch.float16 else out

    def half_safe(self) -> "StageC":
        """Switch to overflow-safe fp16 inference in place: fp16 weights and multiplies, fp32 activations.

        Plain fp16 overflows with the released weights; see :mod:`codec.fp16`.
        """
        return make_half_safe(self)
