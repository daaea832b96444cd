"""EfficientNetV2-S encoder: image → 16-channel, stride-32 latent (the Stage C latent space)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EfficientNetConfig:
    """Hyper-parameters of :class:`EfficientNetEncoder`; defaults = the official encoder (torchvision's
    ``efficientnet_v2_s`` features, 1280 channels out)."""

    c_latent: int = 16
    width: float = 1.0
    depth: float = 1.0
    c_features: int = 1280
    stochastic_depth_prob: float = 0.2


def _scaled_v2_s(width: float, depth: float) -> list:
    """EfficientNetV2-S's stage table (torchvision's) with channels × ``width`` (multiples of 8) and blocks ×
    ``depth`` (rounded up): same strides, kernels, expansions and block types."""
    from torchvision.models import efficientnet as E

    setting, _ = E._efficientnet_conf("efficientnet_v2_s")
    out = []
    for c in setting:
        ch = [E._MBConvConfig.adjust_channels(n, width) for n in (c.input_channels, c.out_channels)]
        layers = int(math.ceil(c.num_layers * depth))
        kind = E.FusedMBConvConfig if isinstance(c, E.FusedMBConvConfig) else E.MBConvConfig
        out.append(kind(c.expand_ratio, c.kernel, c.stride, ch[0], ch[1], layers))
    return out


class EfficientNetEncoder(nn.Module):
    """torchvision ``efficientnet_v2_s`` features + 1×1 conv + non-affine BatchNorm (official keys).

    ``forward`` takes ImageNet-normalised input, as the official module does;
    :meth:`encode` takes RGB in [0,1] and normalises it. Output ``(B,16,ceil(H/32),ceil(W/32))``.
    Always run in eval mode (BatchNorm uses the stored statistics), except when trained.

    ``width``/``depth`` scale V2-S's channels and blocks (1, 1: the official encoder, built by torchvision's
    own ``efficientnet_v2_s``); ``c_features`` is the last feature width (1280 official). Presets:
    :mod:`codec.presets`.
    """

    def __init__(self, c_latent: int = 16, width: float = 1.0, depth: float = 1.0, c_features: int = 1280,
                 stochastic_depth_prob: float = 0.2):
        super().__init__()
        self.config = dict(c_latent=c_latent, width=width, depth=depth, c_features=c_features,
                           stochastic_depth_prob=stochastic_depth_prob)
        if (width, depth, c_features) == (1.0, 1.0, 1280):
            self.backbone = torchvision.models.efficientnet_v2_s(
                weights=None, stochastic_depth_prob=stochastic_depth_prob).features
        else:
            from torchvision.models.efficientnet import EfficientNet

            self.backbone = EfficientNet(_scaled_v2_s(width, depth), dropout=0.0,
                                         stochastic_depth_prob=stochastic_depth_prob,
                                         norm_layer=partial(nn.BatchNorm2d, eps=1e-3),
                                         last_channel=c_features).features
        self.mapper = nn.Sequential(
            nn.Conv2d(c_features, c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent, affine=False),
        )
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images → latent."""
        return self.mapper(self.backbone(x))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images in [0,1] → latent."""
        mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return self((images - mean) / std)
