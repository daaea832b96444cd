"""CLIP-L/14 image conditioning for image variation (``CLIPVisionModelWithProjection`` via transformers).

Official preprocessing: resize the shorter side to 224 with bicubic interpolation and
*no* antialiasing (torchvision tensor behaviour of the release), centre-crop 224²,
normalise with CLIP's mean/std. The condition is the projected ``image_embeds``
(not normalised) as ``(B,1,768)``; the unconditional image condition is zeros.

Weights come from the ``image_encoder/`` folder of the Hugging Face
``stabilityai/stable-cascade-prior`` layout (a local folder or the repo id), or from ComfyUI's
Stage C single-file checkpoint (``clip_l_vision.``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UsageError
from ..text import hf_source, load_clip, quiet_transformers
from ..weights import WeightSource, hf_subfolders

PRIOR_REPO = "stabilityai/stable-cascade-prior"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def clip_preprocess(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """RGB ``(B,3,H,W)`` in [0,1] → the normalised ``(B,3,size,size)`` CLIP input, as the official code makes it."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = TF.resize(images.float(), size, interpolation=InterpolationMode.BICUBIC, antialias=False)
    return TF.normalize(TF.center_crop(x, size), CLIP_MEAN, CLIP_STD)


class ImageEncoder:
    """``CLIPVisionModelWithProjection`` producing Stage C's ``clip_img`` condition."""

    def __init__(self, model, device: torch.device | str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.width = int(model.config.projection_dim)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | WeightSource = PRIOR_REPO,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "ImageEncoder":
        """Load from a folder (or repo id) with an ``image_encoder/`` subfolder, or from ComfyUI's Stage C
        checkpoint (the file, or a folder with one and no ``image_encoder/``)."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from ..layouts.locate import bundled

        found = bundled(source, "image_encoder")
        if found is not None:
            return cls(load_clip(*found, CLIPVisionModelWithProjection, CLIPVisionConfig, dtype, device),
                       device)
        root = hf_subfolders(hf_source(source), ["image_encoder"],
                             "the CLIP image encoder (needed for image variation)")
        with quiet_transformers():
            model = CLIPVisionModelWithProjection.from_pretrained(str(Path(root) / "image_encoder"),
                                                                  torch_dtype=dtype, local_files_only=True)
        return cls(model, device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """RGB ``(B,3,H,W)`` in [0,1] → ``image_embeds`` ``(B,1,width)`` in fp32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"expected RGB images (B,3,H,W), got {list(images.shape)}")
        x = clip_preprocess(images.to(self.device)).to(self.model.dtype)
        return self.model(pixel_values=x).image_embeds.float().unsqueeze(1)
