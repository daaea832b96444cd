"""Control images → the ``cnet`` feature list that a :class:`~codec.controlnet.ControlNet` adds to Stage C."""

from __future__ import annotations

from typing import Sequence

import torch

from ..controlnet import ControlNet
from ..effnet import EfficientNetEncoder
from ..errors import UsageError
from ..images import ImageLike
from . import control_filters as F


def scale_features(cnet: Sequence[torch.Tensor | None], strength: float) -> list[torch.Tensor | None]:
    """Multiply every ControlNet feature by ``strength`` (the notebooks' ``cnet_multiplier``; 1 = as trained)."""
    return [None if c is None else c * strength for c in cnet]


@torch.no_grad()
def control_features(controlnet: ControlNet, image: ImageLike | Sequence[ImageLike], kind: str | None = None,
                     strength: float = 1.0, *, size: tuple[int, int] | None = None, batch_size: int = 1,
                     mask: ImageLike | torch.Tensor | None = None, saliency: F.SaliencyNet | None = None,
                     threshold: float = 0.2, outpaint: bool = False,
                     effnet: EfficientNetEncoder | None = None) -> list[torch.Tensor | None]:
    """The ``cnet`` list for ``StageC.forward`` from a control image, scaled by ``strength``.

    ``size`` is the output image size ``(height, width)`` the caller generates (default:
    the image's size for canny/inpainting, twice it for super_resolution); see
    :func:`~codec.generation.control_filters.control_input` for how each ``kind`` turns the
    image into the ControlNet input (``mask``/``saliency``/``threshold``/``outpaint`` for
    inpainting, ``effnet`` for super_resolution). One image is repeated to ``batch_size``.
    Features are on the ControlNet's device and dtype; give the same list to the
    conditional and the unconditional pass. For super_resolution the features' spatial
    size is the Stage C latent size to generate.
    """
    kind = kind or controlnet.kind
    if kind is None:
        raise UsageError("the ControlNet's kind is unknown; pass kind='canny', 'inpainting' or 'super_resolution'")
    control = F.control_input(kind, image, size=size, mask=mask, saliency=saliency, threshold=threshold,
                              outpaint=outpaint, effnet=effnet)
    x = control.input
    if x.size(0) == 1 and batch_size > 1:
        x = x.expand(batch_size, -1, -1, -1)
    param = next(controlnet.parameters())
    return scale_features(controlnet(x.to(param.device, param.dtype)), strength)
