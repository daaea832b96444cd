"""Control filters: what the released ControlNets were trained to read, computed from an image.

* ``canny``: OpenCV Canny edges (thresholds 100/200) computed at 224×224 and resized back,
  one channel in [0,1] — OpenCV because the released ControlNet was trained on exactly its edges.
* ``inpainting``: the image with the region to fill painted white, plus the mask as a
  fourth channel. The mask is the user's (white = fill) or comes from the official saliency
  net (``SaliencyNet``; its weights ship with the official code, not with the checkpoints:
  see :func:`load_saliency`), thresholded, optionally inverted (outpainting) and smoothed
  with a 141-px Gaussian.
* ``super_resolution``: the EfficientNet latent of the low-resolution image, upsampled 2×
  (nearest); Stage C then generates the 2× latent.

The ``*_filter`` functions reproduce the official filters on tensors (RGB in [0,1],
``(B,3,H,W)``); :func:`control_input` prepares a user's image for inference and
:class:`TrainingControl` applies the official training-time randomness.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from .. import weights as W
from ..codec import encoder_input_size
from ..effnet import EfficientNetEncoder
from ..errors import UsageError
from ..images import ImageLike, to_tensor_list

KINDS = ("canny", "inpainting", "super_resolution")
SALIENCY_FILE = "controlnet/saliency_model.safetensors"
SALIENCY_ORIGIN = "modules/cnet_modules/inpainting/saliency_model.pt"
INPAINT_BLUR = 141


# ----------------------------------------------------------------------------------------------- canny


def canny_filter(images: torch.Tensor, resize: int | None = 224, low_threshold: int = 100,
                 high_threshold: int = 200) -> torch.Tensor:
    """Official ``CannyFilter``: bilinear resize to ``resize``², ``cv2.Canny`` on the uint8 image
    (values truncated, not rounded), back to the input size → ``(B,1,H,W)`` in [0,1], on the CPU."""
    try:
        import cv2
    except ImportError:
        raise ImportError("the canny filter needs OpenCV: pip install opencv-python-headless "
                          "(or cascade-codec[control])") from None
    size = images.shape[-2:]
    x = images.detach().float().cpu()
    if resize is not None:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear")
    arrays = x.mul(255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    edges = torch.stack([torch.from_numpy(cv2.Canny(a, low_threshold, high_threshold)) for a in arrays])
    edges = edges.unsqueeze(1).float().div(255)
    if resize is not None:
        edges = F.interpolate(edges, size=size, mode="bilinear")
    return edges


# ------------------------------------------------------------------------------------------ inpainting


class SaliencyResBlock(nn.Module):
    """Residual block of :class:`SaliencyNet` (key layout ``resblock.{1,2,5,6}``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.resblock = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, kernel_size=3), nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, kernel_size=3), nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.resblock(x)


class NearestUpsample(nn.Module):
    """Nearest-neighbour upsampling by ``scale_factor`` (no parameters)."""

    def __init__(self, scale_factor: float):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")


def _conv_norm_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride),
            nn.InstanceNorm2d(c_out, affine=True), nn.ReLU()]


class SaliencyNet(nn.Module):
    """The official saliency model (``MicroResNet``, same keys): RGB in [0,1] → saliency in (0,1) at 1/8 size."""

    def __init__(self):
        super().__init__()
        self.downsampler = nn.Sequential(*_conv_norm_relu(3, 8, 9, 4), *_conv_norm_relu(8, 16, 3, 2),
                                         *_conv_norm_relu(16, 32, 3, 2))
        self.residual = nn.Sequential(SaliencyResBlock(32), nn.Conv2d(32, 64, kernel_size=1, bias=False, groups=32),
                                      SaliencyResBlock(64))
        self.segmentator = nn.Sequential(*_conv_norm_relu(64, 16, 3), NearestUpsample(2), nn.ReflectionPad2d(4),
                                         nn.Conv2d(16, 1, kernel_size=9), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentator(self.residual(self.downsampler(x)))


def load_saliency(source: str | os.PathLike | W.WeightSource,
                  device: str | torch.device = "cpu") -> SaliencyNet:
    """The saliency net from ``controlnet/saliency_model.safetensors`` in a weights folder (fp32, eval)."""
    src = source if isinstance(source, W.WeightSource) else W.WeightSource(source)
    if not src.has(SALIENCY_FILE):
        where = src.folder if src.folder is not None else src.repo_id
        raise W.WeightsError(
            f"{where} has no {SALIENCY_FILE}, which automatic inpainting masks need. It is not among the released "
            f"checkpoints: it ships with the official Stability-AI/StableCascade code as {SALIENCY_ORIGIN}; convert "
            f"it once with `python -c \"import torch, safetensors.torch as st; st.save_file(torch.load("
            f"'saliency_model.pt', weights_only=True), '{SALIENCY_FILE}')\"` in the weights folder, or give your own "
            "mask instead.")
    return W.load_module(SaliencyNet, src.path(SALIENCY_FILE), torch.float32, device, f"{SALIENCY_FILE} (SaliencyNet)")


def _blur_kernel(height: int, width: int) -> int:
    # Reflection padding needs kernel//2 < side: images under 71 px get the largest odd kernel that fits.
    return min(INPAINT_BLUR, 2 * min(height, width) - 1)


@torch.no_grad()
def saliency_mask(saliency: SaliencyNet, images: torch.Tensor, threshold: float = 0.2,
                  outpaint: bool = False) -> torch.Tensor:
    """Official automatic mask: saliency at short side 240 above ``threshold`` (inverted when ``outpaint``),
    nearest-resized to the image, Gaussian-blurred (141 px) and re-thresholded at 0.5 → bool ``(B,1,H,W)``."""
    param = next(saliency.parameters())
    x = TF.resize(images.to(param.device, param.dtype), 240, antialias=True)
    salient = saliency(x) > threshold
    if outpaint:
        salient = ~salient
    mask = F.interpolate(salient.float(), size=images.shape[-2:], mode="nearest")
    return (TF.gaussian_blur(mask, _blur_kernel(*images.shape[-2:])) > 0.5).to(images.device)


def inpaint_filter(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Official inpainting control: pixels under ``mask`` (bool ``(B,1,H,W)``, True = fill) set to white,
    the mask appended as a fourth channel → ``(B,4,H,W)``."""
    mask = mask.to(images.device)
    painted = torch.where(mask, torch.ones_like(images), images)
    return torch.cat([painted, mask.to(images.dtype)], dim=1)


# ------------------------------------------------------------------------------------ super-resolution


@torch.no_grad()
def sr_filter(effnet: EfficientNetEncoder, images: torch.Tensor,
              scale_factor: float | None = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``SREffnetFilter``: nearest downscale by ``scale_factor`` (``None`` = use the images as
    given), EfficientNet latent, nearest upscale by ``1/scale_factor`` (2 when ``None``).

    Returns ``(latent, image)``: the ControlNet input and the low-resolution image
    blown back up, for display.
    """
    up = 2.0 if scale_factor is None else 1 / scale_factor
    x = images if scale_factor is None else F.interpolate(images, scale_factor=scale_factor, mode="nearest")
    param = next(effnet.parameters())
    latent = effnet.encode(x.to(param.device, param.dtype)).float().to(images.device)
    return (F.interpolate(latent, scale_factor=up, mode="nearest"),
            F.interpolate(x, scale_factor=up, mode="nearest"))


# --------------------------------------------------------------------------------------- for inference


@dataclass
class ControlInput:
    """A ControlNet input and an RGB picture of it (edges, the masked image, the upscaled image)."""

    input: torch.Tensor
    preview: torch.Tensor


def fit(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` (antialiased bilinear, aspect kept) and centre-crop to it."""
    h, w = images.shape[-2:]
    scale = max(size[0] / h, size[1] / w)
    resized = (max(size[0], math.ceil(h * scale - 1e-6)), max(size[1], math.ceil(w * scale - 1e-6)))
    if resized != (h, w):
        images = TF.resize(images, list(resized), antialias=True)
    return TF.center_crop(images, list(size))


def _stack(tensors: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    return torch.stack([fit(t[None], size)[0] for t in tensors])


def _mask_tensor(mask: ImageLike | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A user mask (an image, white = fill, or a bool tensor) → bool ``(B,1,H,W)`` fitted to ``size``."""
    if torch.is_tensor(mask) and mask.dtype == torch.bool:
        return fit(mask.float().reshape(-1, 1, *mask.shape[-2:]), size) > 0.5
    return torch.cat([fit(t[None].mean(dim=1, keepdim=True), size) for t in to_tensor_list(mask)]) > 0.5


def control_input(kind: str, image: ImageLike | Sequence[ImageLike], *, size: tuple[int, int] | None = None,
                  mask: ImageLike | torch.Tensor | None = None, saliency: SaliencyNet | None = None,
                  threshold: float = 0.2, outpaint: bool = False,
                  effnet: EfficientNetEncoder | None = None) -> ControlInput:
    """Turn a control image into the input of the ``kind`` ControlNet, for an output of ``size`` = (H, W).

    The image is fitted (resize to cover, centre crop) to the size the EfficientNet sees
    for that output — ``floor(3/4·side/32)·32``, 768 for 1024 — so the features come out
    at Stage C's latent size, as in training (768² images, 24² latents).

    * canny: edges of that image.
    * inpainting: ``mask`` (an image, white = region to fill, or a bool tensor) or, without
      one, the saliency route with ``saliency``, ``threshold`` (0.2, as the notebooks) and
      ``outpaint`` (fill around the salient object instead).
    * super_resolution: ``effnet``'s latent of the image at half that size, upsampled 2×.
      Default ``size`` is twice the image's size.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown control kind {kind!r}; choose one of {', '.join(KINDS)}")
    tensors = to_tensor_list(image)
    if not tensors:
        raise UsageError("no control image given")
    if kind == "super_resolution":
        if effnet is None:
            raise UsageError("the super_resolution control needs the EfficientNet encoder: pass "
                             "effnet=codec.codec.load_encoder(weights).")
        h, w = size or (2 * tensors[0].shape[-2], 2 * tensors[0].shape[-1])
        latent, preview = sr_filter(effnet, _stack(tensors, encoder_input_size(h // 2, w // 2)), scale_factor=None)
        return ControlInput(latent, preview)
    images = _stack(tensors, encoder_input_size(*(size or tensors[0].shape[-2:])))
    if kind == "canny":
        edges = canny_filter(images)
        return ControlInput(edges, edges.expand(-1, 3, -1, -1))
    if mask is not None:
        fill = _mask_tensor(mask, images.shape[-2:])
    elif saliency is not None:
        fill = saliency_mask(saliency, images, threshold, outpaint)
    else:
        raise UsageError("inpainting needs a mask image (white = region to fill) or the saliency model "
                         f"({SALIENCY_FILE}) to make one")
    x = inpaint_filter(images, fill.expand(images.size(0), -1, -1, -1))
    return ControlInput(x, x[:, :3])


# ---------------------------------------------------------------------------------------- for training


class TrainingControl:
    """The official training-time filter of a control ``kind``: images ``(B,3,H,W)`` → ControlNet input.

    * canny: :func:`canny_filter` (224).
    * inpainting: saliency mask with a threshold drawn from ``U(0.04, 0.4)`` and, with
      probability ``p_outpaint`` = 0.4, inverted — one draw per batch, as officially.
    * super_resolution: :func:`sr_filter` with ``scale_factor`` 0.5.

    Random draws use ``generator`` when given (reproducible runs).
    """

    def __init__(self, kind: str, saliency: SaliencyNet | None = None, effnet: EfficientNetEncoder | None = None,
                 threshold_range: tuple[float, float] = (0.04, 0.4), p_outpaint: float = 0.4,
                 scale_factor: float = 0.5):
        if kind not in KINDS:
            raise UsageError(f"unknown control kind {kind!r}; choose one of {', '.join(KINDS)}")
        if kind == "inpainting" and saliency is None:
            raise UsageError(f"training an inpainting ControlNet needs the saliency model ({SALIENCY_FILE})")
        if kind == "super_resolution" and effnet is None:
            raise UsageError("training a super_resolution ControlNet needs the EfficientNet encoder")
        self.kind, self.saliency, self.effnet = kind, saliency, effnet
        self.threshold_range, self.p_outpaint, self.scale_factor = threshold_range, p_outpaint, scale_factor

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "canny":
            return canny_filter(images).to(images.device)
        if self.kind == "super_resolution":
            return sr_filter(self.effnet, images, self.scale_factor)[0]
        lo, hi = self.threshold_range
        threshold = lo + (hi - lo) * torch.rand((), generator=generator).item()
        outpaint = torch.rand((), generator=generator).item() < self.p_outpaint
        return inpaint_filter(images, saliency_mask(self.saliency, images, threshold, outpaint))

