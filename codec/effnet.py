"""EfficientNetV2-S encoder: image → 16-channel, stride-32 latent (the Stage C latent space)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EfficientNetEncoder(nn.Module):
    """torchvision ``efficientnet_v2_s`` features + 1×1 conv + non-affine BatchNorm (official keys).

    ``forward`` takes ImageNet-normalised input, as the official module does;
    :meth:`encode` takes RGB in [0,1] and normalises it. Output ``(B,16,ceil(H/32),ceil(W/32))``.
    Always run in eval mode (BatchNorm uses the stored statistics).
    """

    def __init__(self, c_latent: int = 16):
        super().__init__()
        self.backbone = torchvision.models.efficientnet_v2_s(weights=None).features
        self.mapper = nn.Sequential(
            nn.Conv2d(1280, c_latent, kernel_size=1, bias=False),
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
