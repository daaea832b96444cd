"""Finding a component in a weight source in any layout (official, diffusers, ComfyUI), opening it under the
official keys, and the messages that say what is missing and what would do instead."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import weights as W
from . import comfyui
from .diffusers import (
    DIFFUSERS_CONFIG,
    DIFFUSERS_FOLDERS,
    DIFFUSERS_WEIGHTS,
    HF_FOLDERS,
    HF_WEIGHTS,
    config_from_diffusers,
    diffusers_variant,
    has_diffusers_layout,
    plan_to_official,
)
from .official import LAYOUT_ORDER, Located, kind_of, official_files


def locate_all(src: W.WeightSource, component: str) -> list[Located]:
    """Every variant of ``component`` present in ``src`` (a folder, or what a repo id has in the local cache):
    official files first, fp32 before bf16, then diffusers folders, then ComfyUI checkpoints. The Hugging Face
    folders of the CLIP encoders (``text_encoder/``, ``image_encoder/``) count as the diffusers layout."""
    found = [Located(component, "official", v, (name,)) for v, name in official_files(component).items()
             if src.has(name)]
    variants = DIFFUSERS_WEIGHTS if component in DIFFUSERS_FOLDERS else HF_WEIGHTS if component in HF_FOLDERS else {}
    for variant in variants:
        loc = diffusers_variant(src, component, variant)
        if loc is not None:
            found.append(loc)
    return found + comfyui.locate_all(src, component)




def locate(src: W.WeightSource, component: str, dtype: torch.dtype) -> Located | None:
    """The variant of ``component`` to load into ``dtype``: a single file given as the source first, then the
    official file, the diffusers folder and ComfyUI checkpoints in that order (when a source has several, as the
    hub repo does); the bf16 variant for bf16/fp16 models, else fp32; ``None`` if absent."""
    low = dtype in (torch.bfloat16, torch.float16)
    found = locate_all(src, component)
    found.sort(key=lambda loc: (0 if src.pinned and loc.files[0] == src.pinned else LAYOUT_ORDER[loc.layout],
                                (loc.variant == "bf16") != low))
    return found[0] if found else None


def default_size(src: W.WeightSource, kind: str) -> str:
    """``"lite"``, unless ``src`` is a single file holding a Stage B/C (``kind``) of another size, or a source
    whose only Stage B is the mini one (the built-in ``mini`` codec)."""
    if src.pinned:
        held = comfyui.model_component(src.header(src.pinned))
        if held is not None and kind_of(held) == kind:
            return held.rsplit("_", 1)[1]
    if kind == "stage_b" and src.folder is not None and locate(src, "stage_b_mini", torch.float32) is not None \
            and not any(locate(src, f"stage_b_{size}", torch.float32) for size in ("lite", "large")):
        return "mini"
    return "lite"


def resolve(src: W.WeightSource, component: str, dtype: torch.dtype, default: str) -> Located:
    """:func:`locate`, or else the official file ``default`` (to download, or to name as missing)."""
    return locate(src, component, dtype) or Located.official_file(default, component)


def require(src: W.WeightSource, locs: Sequence[Located], extra: Sequence[str] = ()) -> None:
    """Make sure the official files among ``locs`` and the files ``extra`` are there (downloading them for a repo
    id); one error names every missing file and, for a folder, what would do instead in the other layouts."""
    try:
        src.require([loc.files[0] for loc in locs if loc.layout == "official"] + list(extra))
    except W.WeightsError as e:
        if src.folder is None or src.builtin is not None:
            raise
        missing = [loc.component for loc in locs if loc.layout == "official" and not src.has(loc.files[0])]
        raise W.WeightsError(f"{e}\n{other_layouts_hint(missing)}{_other_size_hint(src, missing)}" if missing
                             else str(e)) from None


def _other_size_hint(src: W.WeightSource, missing: Sequence[str]) -> str:
    """Where a missing Stage B/C size is present in the other size: the argument that selects it."""
    hints = []
    for component in missing:
        kind, _, size = component.rpartition("_")
        other = f"{kind}_{'large' if size == 'lite' else 'lite'}" if kind in ("stage_b", "stage_c") else None
        there = locate(src, other, torch.float32) if other else None
        if there is not None:
            wanted = other.rpartition("_")[2]
            hints.append(f"\n({src.source} has {there.label}, the {wanted} {kind.replace('_', ' ').title()}: pass "
                         f"{kind}={wanted!r} or --{kind.replace('_', '-')} {wanted}.)")
    return "".join(hints)


def open_component(src: W.WeightSource, loc: Located) -> tuple[W.Checkpoint, dict[str, Any] | None]:
    """The checkpoint of ``loc`` under official keys (mapped while streaming) and its stored configuration in our
    names (``None`` for an official file without one: the preset of its name applies)."""
    if loc.layout == "comfyui":
        return comfyui.open_section(src, loc)
    paths = [src.path(f) for f in loc.files]
    ckpt = W.Checkpoint.open(paths[0] if len(paths) == 1 else paths)
    if loc.layout == "official":
        return ckpt, ckpt.config
    if not src.has(loc.config_file):
        raise W.WeightsError(f"{src.source} has {loc.files[0]} but no {loc.config_file}; a model folder of the "
                             "diffusers layout needs both (download config.json too).")
    where = f"{src.source}/{loc.config_file}"
    try:
        config = json.loads(src.path(loc.config_file).read_text())
    except ValueError as e:
        raise W.WeightsError(f"{where} is not valid JSON ({e}); download it again.") from None
    if loc.component in HF_FOLDERS:  # transformers' own keys and config
        return ckpt, config
    kind = kind_of(loc.component)
    ours = config_from_diffusers(kind, config, where)
    return ckpt.remap(plan_to_official(ckpt.shapes(), kind, str(ckpt.path))), ours




def has_other_layout(src: W.WeightSource) -> bool:
    """Whether ``src`` holds diffusers model folders or ComfyUI checkpoints."""
    return has_diffusers_layout(src) or bool(comfyui.candidate_files(src))


def other_layouts_hint(components: Sequence[str]) -> str:
    """The diffusers folders and ComfyUI files that can stand in for the official files of ``components``."""
    folders = " and ".join(f"{DIFFUSERS_FOLDERS[c]}/" for c in components if c in DIFFUSERS_FOLDERS)
    files = ", ".join(dict.fromkeys(comfyui.file_holding(c) for c in components))
    if not folders:
        return f"(A ComfyUI single-file checkpoint works too: {files}.)"
    return (f"(The diffusers layout works too: {folders}, each with {DIFFUSERS_CONFIG} and "
            f"{DIFFUSERS_WEIGHTS['fp32']} or its .bf16 variant; it has no EfficientNet encoder, so it cannot "
            f"encode images. So do ComfyUI's single-file checkpoints: {files}.)")


def locate_encoder(src: W.WeightSource) -> Located:
    """Where the EfficientNet encoder of ``src`` is (the official file, or inside a ComfyUI Stage C checkpoint);
    a :class:`~codec.errors.WeightsError` that says what to get when it is nowhere."""
    loc = locate(src, "effnet", torch.float32)
    if loc is None:
        require_encoder(src)  # explains what is missing (or fetches the official file of a repo id)
        loc = Located.official_file(W.EFFNET_FILE, "effnet")
    return loc


def require_encoder(src: W.WeightSource) -> None:
    """Make sure ``effnet_encoder.safetensors`` itself is there; for a source in another layout say why not."""
    if not src.has(W.EFFNET_FILE) and has_other_layout(src):
        raise W.WeightsError(no_effnet_message(src))
    src.require([W.EFFNET_FILE])


def no_effnet_message(src: W.WeightSource) -> str:
    """Why a source in the diffusers or ComfyUI layout has no (separate) encoder, and the file to get."""
    where = src.folder if src.folder is not None else src.repo_id
    inside = next((loc for loc in locate_all(src, "effnet") if loc.layout == "comfyui"), None)
    if inside is not None:
        return (f"{where} has no {W.EFFNET_FILE} of its own: the EfficientNet encoder is inside {inside.files[0]} "
                f"(as its vae.encoder). `cascade convert {src.source} DIR --to official` writes it to "
                f"DIR/{W.EFFNET_FILE}.")
    return (f"{where} has no {W.EFFNET_FILE}: the EfficientNet encoder exists only in the official layout and in "
            f"ComfyUI's stable_cascade_stage_c.safetensors (diffusers ships none, nor does ComfyUI's Stage B "
            f"file), so this source can decode but not encode. Download {W.EFFNET_FILE} from "
            f"https://huggingface.co/{W.OFFICIAL_REPO}/resolve/main/{W.EFFNET_FILE} into {where}"
            f"{'/' if src.folder is not None else ' (or a folder you pass instead)'}.")


def bundled(source: str | os.PathLike | W.WeightSource, component: str) -> tuple[W.WeightSource, Located] | None:
    """The ComfyUI checkpoint to read ``component`` (a CLIP encoder) from, when a local ``source`` is such a file
    or a folder whose Hugging Face folder of it (``text_encoder/``, ``image_encoder/``) is absent; else ``None``
    (a repo id: its Hugging Face folders, not a 9 GB download)."""
    if not isinstance(source, W.WeightSource):
        if not Path(source).expanduser().exists():
            return None
        source = W.WeightSource(source)
    if source.folder is None:
        return None
    loc = locate(source, component, torch.float32)
    return (source, loc) if loc is not None and loc.layout == "comfyui" else None
