"""The official checkpoint layout: flat files at the root of a weights folder (``stage_a.safetensors``,
``stage_b_lite_bf16.safetensors``, ``stage_c.safetensors``, …) under the official module names, which are
ours. Also what every layout shares: the component names, :class:`Located` (where one variant of one
component is) and the components' official default configurations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import weights as W
from ..presets import get_preset

COMPONENTS = ("stage_a", "stage_b_lite", "stage_b_large", "stage_b_mini", "stage_c_lite", "stage_c_large")
# Components outside the diffusers model folders: root files of the official layout, or the Hugging Face
# folders (text_encoder/, image_encoder/, read by transformers), or sections of a ComfyUI checkpoint.
EXTRA_COMPONENTS = ("effnet", "previewer", "text_encoder", "image_encoder")
ROOT_FILES = {"effnet": W.EFFNET_FILE, "previewer": W.PREVIEWER_FILE}

OFFICIAL_FILES: dict[str, dict[str, str]] = {
    "stage_a": {"fp32": W.STAGE_A_FILE},
    "stage_b_lite": W.STAGE_B_FILES["lite"],
    "stage_b_large": W.STAGE_B_FILES["large"],
    "stage_b_mini": W.STAGE_B_FILES["mini"],
    "stage_c_lite": W.STAGE_C_FILES["lite"],
    "stage_c_large": W.STAGE_C_FILES["large"],
}
VARIANT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

OFFICIAL_STAGE_A_SCALE = 0.43
WUERSTCHEN_V2_SCALE = 0.3764
_STAGE_A_ORIGINS = {
    OFFICIAL_STAGE_A_SCALE: "the official Stage A's scale (stage_a.safetensors, what Stage B was trained with)",
    WUERSTCHEN_V2_SCALE: "the Würstchen v2 VQGAN's scale (what diffusers ships in vqgan/ on the hub, "
                         "not the official stage_a.safetensors)",
}

LAYOUT_ORDER = {"official": 1, "diffusers": 2, "comfyui": 3}


def kind_of(component: str) -> str:
    """``"stage_b"`` or ``"stage_c"`` for a component name like ``stage_b_lite``; other names as they are."""
    return component.rsplit("_", 1)[0] if component.startswith(("stage_b_", "stage_c_")) else component


def default_config(component: str) -> dict[str, Any]:
    """The official constructor arguments of a component (the preset its official file name stands for)."""
    return get_preset(component).kwargs()


def describe_stage_a(scale: float) -> str:
    """What a Stage A scale factor says about where the weights come from."""
    origin = _STAGE_A_ORIGINS.get(round(float(scale), 6), "not a released Stage A's scale")
    return f"scale_factor {scale:g}: {origin}"


TITLES = {"stage_a": "Stage A", "stage_b": "Stage B", "stage_c": "Stage C", "effnet": "EfficientNet encoder",
          "previewer": "Previewer", "text_encoder": "CLIP-G text encoder", "image_encoder": "CLIP-L image encoder"}


def title(component: str) -> str:
    """Human name of a component (``Stage C lite``, ``CLIP-G text encoder``)."""
    kind = kind_of(component)
    return TITLES[kind] + (f" {component.rsplit('_', 1)[1]}" if kind != component else "")


@dataclass(frozen=True)
class Located:
    """Where one variant of one component is in a weight source."""

    component: str
    layout: str  # "official" | "diffusers" | "comfyui"
    variant: str  # "fp32" | "bf16", as the file is named (ComfyUI: as the model's tensors are stored)
    files: tuple[str, ...]  # names relative to the source (several for shards)
    config_file: str | None = None

    @property
    def label(self) -> str:
        """Short human name: the official file, ``folder/`` with variant and shard count, or the ComfyUI file
        and the part of it."""
        if self.layout == "official":
            return self.files[0]
        if self.layout == "comfyui":
            return f"{self.files[0]}: {title(self.component)}"
        shards = f", {len(self.files)} shards" if len(self.files) > 1 else ""
        return f"{self.files[0].split('/')[0]}/ ({self.variant}{shards})"

    @classmethod
    def official_file(cls, name: str, component: str = "") -> "Located":
        """A file of the official layout that has no diffusers counterpart (EfficientNet, Previewer)."""
        return cls(component or name, "official", "fp32", (name,))


def official_files(component: str) -> dict[str, str]:
    """The official file of each variant (``fp32``/``bf16``) of ``component``; empty if it has none."""
    if component in ROOT_FILES:
        return {"fp32": ROOT_FILES[component]}
    return OFFICIAL_FILES.get(component, {})
