"""ControlNet for Stage C: an image-like control (edges, a masked image, a low-res latent) → features added
to Stage C before chosen ResBlock calls.

Constructor arguments and state-dict keys are those of the official ``ControlNet``; the
released ``controlnet/{canny,inpainting,super_resolution}.safetensors`` load with
``strict=True``. A backbone turns the control into an embedding (three kinds:
``effnet`` = EfficientNetV2-S features, stride 32; ``simple`` = two 3×3 convs;
``large`` = 1×1 convs and eight residual conv blocks, both at the input's resolution),
then one projection per entry of ``proj_blocks`` maps it to Stage C's width. The output
is a list with one slot per ResBlock call of Stage C (``None`` where nothing is added),
which is what ``StageC.forward(..., cnet=...)`` consumes.

Official quirk kept: for a control with ``c_in != 3`` channels the EfficientNet stem conv
is replaced by one **without padding** (the original pads by 1).

Typical use (what ``cascade generate --controlnet canny`` does)::

    controlnet = codec.codec.load_controlnet(weights_dir, "canny")
    cnet = control_features(controlnet, "edges.jpg", "canny", strength=1.0, size=(1024, 1024))
    # the same list goes to the conditional and the unconditional Stage C pass
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torchvision
from torch import nn

from .blocks import LayerNorm2d
from .errors import UsageError

# Stage C ResBlock calls (of 64 in the 3.6B model) that the released ControlNets feed.
CONTROLNET_BLOCKS = [0, 4, 8, 12, 51, 55, 59, 63]

@dataclass(frozen=True)
class ControlNetConfig:
    """Hyper-parameters of :class:`ControlNet` (official names). The official configurations per control
    kind (``configs/inference/controlnet_c_3b_*.yaml``) are the ``controlnet_<kind>`` presets of
    :mod:`codec.presets`."""

    c_in: int = 3
    c_proj: int = 2048
    proj_blocks: list = field(default_factory=lambda: list(CONTROLNET_BLOCKS))
    bottleneck_mode: str = "effnet"


# Released files, relative to the weights folder (as on the Hugging Face repo).
CONTROLNET_FILES = {kind: f"controlnet/{kind}.safetensors" for kind in ("canny", "inpainting", "super_resolution")}

EFFNET_STEM_CHANNELS = 24
EFFNET_CHANNELS = 1280


class CNetResBlock(nn.Module):
    """Pre-norm residual block of the ``large`` backbone: ``x + (LN, GELU, conv3×3, LN, GELU, conv3×3)(x)``."""

    def __init__(self, c: int):
        super().__init__()
        self.blocks = nn.Sequential(
            LayerNorm2d(c), nn.GELU(), nn.Conv2d(c, c, kernel_size=3, padding=1),
            LayerNorm2d(c), nn.GELU(), nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


def adapt_stem(rgb_weight: torch.Tensor, c_in: int) -> torch.Tensor:
    """The official stem rule for a ``c_in``-channel control: extra channels start at 0, fewer keep the first ones."""
    if c_in > rgb_weight.size(1):
        weight = torch.zeros(rgb_weight.size(0), c_in, *rgb_weight.shape[2:], dtype=rgb_weight.dtype,
                             device=rgb_weight.device)
        weight[:, :rgb_weight.size(1)] = rgb_weight
        return weight
    return rgb_weight[:, :c_in].clone()


def _effnet_backbone(c_in: int) -> nn.Sequential:
    backbone = torchvision.models.efficientnet_v2_s(weights=None).features
    if c_in != 3:
        rgb_weight = backbone[0][0].weight.data
        # padding=0 is the official quirk (the RGB stem has padding=1); the output is still ~H/32.
        stem = nn.Conv2d(c_in, EFFNET_STEM_CHANNELS, kernel_size=3, stride=2, bias=False)
        stem.weight.data = adapt_stem(rgb_weight, c_in)
        backbone[0][0] = stem
    return backbone


class ControlNet(nn.Module):
    """Official ``ControlNet(c_in, c_proj, proj_blocks, bottleneck_mode)``; ``forward(x)`` → list of features.

    ``proj_blocks=None`` means the released list ``[0, 4, 8, 12, 51, 55, 59, 63]`` and
    ``bottleneck_mode=None`` means ``'effnet'``. The EfficientNet backbone always runs in
    eval mode (its BatchNorm statistics stay frozen, as in official training, where the
    weights are still trained). ``kind`` names the control (``canny`` …) when known.
    """

    def __init__(self, c_in: int = 3, c_proj: int = 2048, proj_blocks: Sequence[int] | None = None,
                 bottleneck_mode: str | None = None):
        super().__init__()
        bottleneck_mode = bottleneck_mode or "effnet"
        proj_blocks = list(CONTROLNET_BLOCKS if proj_blocks is None else proj_blocks)
        if not proj_blocks or min(proj_blocks) < 0:
            raise UsageError(f"proj_blocks must be a non-empty list of ResBlock indices ≥ 0, got {proj_blocks}")
        self.config = dict(c_in=c_in, c_proj=c_proj, proj_blocks=proj_blocks, bottleneck_mode=bottleneck_mode)
        self.proj_blocks = proj_blocks
        self.kind: str | None = None
        if bottleneck_mode == "effnet":
            embd_channels = EFFNET_CHANNELS
            self.backbone = _effnet_backbone(c_in)
        elif bottleneck_mode == "simple":
            embd_channels = c_in
            self.backbone = nn.Sequential(
                nn.Conv2d(c_in, c_in * 4, kernel_size=3, padding=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(c_in * 4, c_in, kernel_size=3, padding=1),
            )
        elif bottleneck_mode == "large":
            embd_channels = EFFNET_CHANNELS
            self.backbone = nn.Sequential(
                nn.Conv2d(c_in, 16384, kernel_size=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(16384, 1024, kernel_size=1),
                *[CNetResBlock(1024) for _ in range(8)],
                nn.Conv2d(1024, embd_channels, kernel_size=1),
            )
        else:
            raise UsageError(f"unknown bottleneck_mode {bottleneck_mode!r}; use 'effnet', 'simple' or 'large'")
        self.projections = nn.ModuleList()
        for _ in proj_blocks:
            projection = nn.Sequential(
                nn.Conv2d(embd_channels, embd_channels, kernel_size=1, bias=False),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(embd_channels, c_proj, kernel_size=1, bias=False),
            )
            # A new ControlNet starts as a no-op: Stage C's output is unchanged until it learns.
            nn.init.zeros_(projection[-1].weight)
            self.projections.append(projection)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ControlNet":
        """Set training mode; an EfficientNet backbone stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        if self.config["bottleneck_mode"] == "effnet":
            self.backbone.eval()
        return self

    @torch.no_grad()
    def init_backbone(self, features_state: Mapping[str, torch.Tensor]) -> None:
        """Start an ``effnet`` backbone from EfficientNetV2-S feature weights (to train a new ControlNet).

        ``features_state`` uses torchvision ``features`` keys (``0.0.weight`` …); a full
        :class:`~codec.effnet.EfficientNetEncoder` state (``backbone.`` prefix) is accepted too.
        The stem is adapted to ``c_in`` as officially (zeros for extra channels).
        """
        if self.config["bottleneck_mode"] != "effnet":
            raise UsageError("init_backbone applies to the 'effnet' bottleneck only")
        state = {k.removeprefix("backbone."): v for k, v in features_state.items()
                 if not k.startswith("mapper.")}
        stem_key = "0.0.weight"
        state[stem_key] = adapt_stem(state[stem_key], self.config["c_in"])
        self.backbone.load_state_dict(state, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Control input ``(B, c_in, H, W)`` → list of length ``max(proj_blocks)+1``, features at the
        ``proj_blocks`` positions (``(B, c_proj, h, w)``, h = H/32 for ``effnet``, H otherwise), ``None``
        elsewhere."""
        embedding = self.backbone(x)
        features: list[torch.Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for index, projection in zip(self.proj_blocks, self.projections):
            features[index] = projection(embedding)
        return features
