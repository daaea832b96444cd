"""Every named model configuration, in one registry: ``create_model("stage_b_lite")``.

A :class:`Preset` is a model family (which class builds it), the family's hyper-parameters as
its config dataclass (official names) and, for released models, the official file names in a
weights folder. Families and their presets:

* ``stage_a``: ``stage_a`` (official), ``stage_a_mini`` (built-in codec), ``stage_a_tiny``
* ``effnet``: ``efficientnet_v2_s`` (official), ``efficientnet_mini``
* ``stage_b``: ``stage_b_large``, ``stage_b_lite`` (official), ``stage_b_mini``, ``stage_b_tiny``
* ``stage_c``: ``stage_c_large``, ``stage_c_lite`` (official), ``stage_c_tiny``
* ``previewer``: ``previewer`` (official), ``previewer_tiny``
* ``controlnet``: ``controlnet_<kind>`` for canny, inpainting, super_resolution (released) and
  identity (configured officially, never released); ``controlnet_<kind>_tiny``

``tiny`` presets exercise every code path at a fraction of the size (tests, demos); ``mini`` ones
are the built-in codec's (:mod:`codec.mini`). The EfficientNet has no tiny preset: its official
shape is fixed and small enough for tests.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any, Mapping

from torch import nn

from . import weights as W
from .controlnet import CONTROLNET_FILES, ControlNet, ControlNetConfig
from .effnet import EfficientNetConfig, EfficientNetEncoder
from .errors import UsageError
from .previewer import Previewer, PreviewerConfig
from .stage_a import StageA, StageAConfig
from .stage_b import StageB, StageBConfig
from .stage_c import StageC, StageCConfig

FAMILIES: Mapping[str, type[nn.Module]] = MappingProxyType({
    "stage_a": StageA, "effnet": EfficientNetEncoder, "stage_b": StageB, "stage_c": StageC,
    "previewer": Previewer, "controlnet": ControlNet,
})


@dataclass(frozen=True)
class Preset:
    """One named configuration: ``family`` (a key of :data:`FAMILIES`), its ``config`` dataclass and the
    official ``files`` (relative to a weights folder) that hold its released weights, fp32 first."""

    name: str
    family: str
    config: Any
    files: tuple[str, ...] = ()
    description: str = ""

    def kwargs(self) -> dict[str, Any]:
        """The model's constructor arguments (a fresh copy, safe to change)."""
        return copy.deepcopy(asdict(self.config))


def _variants(files: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(files[k] for k in ("fp32", "bf16") if k in files)


_TINY_CONTROLNET = dict(c_proj=64, proj_blocks=[0, 3, 9])  # fits stage_c_tiny: width 64, 10 ResBlock calls

_ALL = [
    Preset("stage_a", "stage_a", StageAConfig(), (W.STAGE_A_FILE,), "official Stage A (f4 VQGAN), 20M"),
    # Its scale factor is set after training, and stored in the built-in model's file.
    Preset("stage_a_mini", "stage_a", StageAConfig(bottleneck_blocks=4, c_hidden=96, codebook_size=1024),
           description="the built-in mini codec's Stage A, 0.57M"),
    Preset("stage_a_tiny", "stage_a", StageAConfig(bottleneck_blocks=2, c_hidden=32, codebook_size=64),
           description="tiny, for tests"),
    Preset("efficientnet_v2_s", "effnet", EfficientNetConfig(), (W.EFFNET_FILE,),
           "official EfficientNetV2-S encoder (torchvision's efficientnet_v2_s features)"),
    Preset("efficientnet_mini", "effnet",
           EfficientNetConfig(width=0.25, depth=0.34, c_features=256, stochastic_depth_prob=0.0),
           description="the built-in mini codec's encoder: V2-S's layout, 1/4 the channels, 1/3 the blocks"),
    Preset("stage_b_large", "stage_b", StageBConfig(), _variants(W.STAGE_B_FILES["large"]), "official, 1.5B"),
    Preset("stage_b_lite", "stage_b",
           StageBConfig(c_hidden=[320, 576, 1152, 1152], nhead=[-1, 9, 18, 18], blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
                        block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]]),
           _variants(W.STAGE_B_FILES["lite"]), "official, 700M"),
    Preset("stage_b_mini", "stage_b",
           StageBConfig(c_cond=128, c_hidden=[32, 64, 128, 256], nhead=[-1, -1, 4, 8], blocks=[[1, 1, 2, 2], [2, 2, 1, 1]],
                        block_repeat=[[1, 1, 1, 1], [1, 1, 1, 1]], c_clip=64, dropout=[0, 0, 0, 0]),
           _variants(W.STAGE_B_FILES["mini"]), "the built-in mini codec's Stage B, 5M (256² images)"),
    Preset("stage_b_tiny", "stage_b",
           StageBConfig(c_cond=32, c_hidden=[8, 16, 32, 32], nhead=[-1, -1, 2, 2], blocks=[[1, 1, 2, 1], [1, 2, 1, 1]],
                        block_repeat=[[1, 1, 1, 1], [2, 2, 1, 2]], c_clip=24),
           description="tiny, for tests; its c_clip matches stage_c_tiny's text width"),
    Preset("stage_c_large", "stage_c", StageCConfig(), _variants(W.STAGE_C_FILES["large"]), "official, 3.6B"),
    Preset("stage_c_lite", "stage_c",
           StageCConfig(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]]),
           _variants(W.STAGE_C_FILES["lite"]), "official, 1.0B"),
    Preset("stage_c_tiny", "stage_c",
           StageCConfig(c_cond=64, c_hidden=[64, 64], nhead=[2, 2], blocks=[[2, 3], [3, 2]], c_clip_text=24,
                        c_clip_text_pooled=24, c_clip_img=16),
           description="tiny, for tests"),
    Preset("previewer", "previewer", PreviewerConfig(), (W.PREVIEWER_FILE,), "official Previewer"),
    Preset("previewer_tiny", "previewer", PreviewerConfig(c_hidden=32), description="tiny, for tests"),
    Preset("controlnet_canny", "controlnet", ControlNetConfig(c_in=1), (CONTROLNET_FILES["canny"],), "official"),
    Preset("controlnet_inpainting", "controlnet", ControlNetConfig(c_in=4), (CONTROLNET_FILES["inpainting"],),
           "official"),
    Preset("controlnet_super_resolution", "controlnet", ControlNetConfig(c_in=16, bottleneck_mode="large"),
           (CONTROLNET_FILES["super_resolution"],), "official"),
    # Configured officially but never released (its face-ID filter needs insightface models).
    Preset("controlnet_identity", "controlnet",
           ControlNetConfig(c_in=512, proj_blocks=list(range(64)), bottleneck_mode="simple"),
           description="official configuration, never released"),
    Preset("controlnet_canny_tiny", "controlnet", ControlNetConfig(c_in=1, **_TINY_CONTROLNET),
           description="tiny, for tests"),
    Preset("controlnet_inpainting_tiny", "controlnet", ControlNetConfig(c_in=4, **_TINY_CONTROLNET),
           description="tiny, for tests"),
    # The official 'large' bottleneck has fixed widths (203M parameters): the tiny one uses 'simple'.
    Preset("controlnet_super_resolution_tiny", "controlnet",
           ControlNetConfig(c_in=16, bottleneck_mode="simple", **_TINY_CONTROLNET), description="tiny, for tests"),
]

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _ALL})

#: The control kinds with an official configuration (``controlnet_<kind>`` presets).
CONTROLNET_KINDS = tuple(p.name.removeprefix("controlnet_") for p in _ALL
                         if p.family == "controlnet" and not p.name.endswith("_tiny"))


def list_presets(family: str | None = None, pattern: str = "*") -> list[str]:
    """Names of the presets of ``family`` (all families when ``None``) that match the glob ``pattern``."""
    if family is not None and family not in FAMILIES:
        raise UsageError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return sorted(n for n, p in PRESETS.items()
                  if (family is None or p.family == family) and fnmatch.fnmatchcase(n, pattern))


def get_preset(name: str, family: str | None = None) -> Preset:
    """The preset called ``name`` (of ``family``, when given); an unknown name is a :class:`UsageError` that
    lists the choices."""
    preset = PRESETS.get(name)
    if preset is None or (family is not None and preset.family != family):
        raise UsageError(f"unknown {family or 'model'} preset {name!r}; choose one of "
                         f"{', '.join(list_presets(family))}")
    return preset


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the model of preset ``name`` with random weights; ``overrides`` change hyper-parameters."""
    preset = get_preset(name)
    config = replace(preset.config, **overrides) if overrides else preset.config
    return FAMILIES[preset.family](**copy.deepcopy(asdict(config)))
