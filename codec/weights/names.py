"""Names: the official repo and file names, the models shipped in the package, and the metadata keys of
our own files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OFFICIAL_REPO = "stabilityai/stable-cascade"
# The environment variable that names the weights to use when none are given.
WEIGHTS_ENV = "CASCADE_WEIGHTS"

# Official file names, per component. Stage B files by preset and precision.
STAGE_A_FILE = "stage_a.safetensors"
EFFNET_FILE = "effnet_encoder.safetensors"
PREVIEWER_FILE = "previewer.safetensors"
STAGE_B_FILES = {
    "lite": {"fp32": "stage_b_lite.safetensors", "bf16": "stage_b_lite_bf16.safetensors"},
    "large": {"fp32": "stage_b.safetensors", "bf16": "stage_b_bf16.safetensors"},
    "mini": {"fp32": "stage_b_mini.safetensors", "bf16": "stage_b_mini_bf16.safetensors"},
}
STAGE_C_FILES = {
    "lite": {"fp32": "stage_c_lite.safetensors", "bf16": "stage_c_lite_bf16.safetensors"},
    "large": {"fp32": "stage_c.safetensors", "bf16": "stage_c_bf16.safetensors"},
}
EMPTY_CAPTION_FILE = "clip_pooled_empty.safetensors"


@dataclass(frozen=True)
class BuiltinModel:
    """A codec shipped inside the package: its folder (official file layout) and the output side it was trained
    at (the encoder sees :func:`codec.codec.encoder_input_size` of it, as for the official models: 256 → 192 →
    6×6 latents)."""

    folder: Path
    native_size: int


# Models shipped inside the package, by the name that selects them wherever a weights source is asked for.
BUILTIN_MODELS = {"mini": BuiltinModel(Path(__file__).resolve().parent.parent / "mini", 256)}

META_CONFIG = "cascade_codec.config"
META_NOTE = "cascade_codec.note"
META_SAMPLING = "cascade_codec.sampling"  # a model's own sampler defaults (JSON), e.g. the mini Stage B's x0_clamp
