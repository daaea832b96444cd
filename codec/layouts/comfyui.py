"""ComfyUI's all-in-one single-file checkpoints of Stable Cascade: what they hold, under which keys.

The Hugging Face repo ``stabilityai/stable-cascade`` ships two in ``comfyui_checkpoints/``:

* ``stable_cascade_stage_c.safetensors`` (9.22 GB): Stage C under ``model.diffusion_model.``;
  the CLIP-G text encoder under ``text_encoder.clip_g.transformer.`` in transformers'
  ``CLIPTextModel`` naming, its projection as ``text_encoder.clip_g.text_projection`` stored
  *transposed* (``[in, out]``: ComfyUI once multiplied ``pooled @ text_projection``); the
  "VAE" of ComfyUI's ``StageC_coder``: the EfficientNet encoder under ``vae.encoder.`` and
  the Previewer under ``vae.previewer.``; and the CLIP ViT-L/14 image encoder under
  ``clip_l_vision.`` in transformers' ``CLIPVisionModelWithProjection`` naming.
* ``stable_cascade_stage_b.safetensors`` (4.55 GB): Stage B under ``model.diffusion_model.``,
  Stage A as the "VAE" under ``vae.``, and the CLIP-G text encoder again.

Facts from ComfyUI's source (``comfy/supported_models.py`` ``Stable_Cascade_C``/``_B``,
``comfy/model_detection.py``, ``comfy/sd.py``, ``comfy/sdxl_clip.py``) and from load logs
users posted (Comfy-Org/ComfyUI#2984, Stability-AI/StableCascade#86):

* the model keys are the official ones under the prefix, attention packed in
  ``attn.in_proj_*``: ComfyUI splits it into ``attn.to_q/to_k/to_v`` when loading, so files
  that ComfyUI saves itself hold those; both read here;
* ComfyUI tells Stage C from Stage B by ``clf.1.weight`` plus ``clip_txt_mapper.weight``
  (Stage C; 2048 rows = the 3.6B model, 1536 = lite) or ``clip_mapper.weight`` (Stage B;
  ``down_blocks.1.0.channelwise.0.weight`` 640 wide = large, 576 = lite); it builds the
  model from that size alone, so only the released sizes load there;
* the VAE is recognised by ``vquantizer.codebook.weight`` (Stage A) or
  ``encoder.backbone.1.0.block.0.1.num_batches_tracked`` (encoder + Previewer);
  ComfyUI's encoder module also has ``mean``/``std`` parameters (the ImageNet constants)
  and its text model a ``logit_scale``, which the hub files lack (the logs report them
  missing) and which are dropped when read here;
* ComfyUI decodes Stage A with the official scale 0.43 (its ``SC_B`` latent format).

That the hub's Stage B file carries CLIP-G too is inferred: its size is Stage B + CLIP-G +
Stage A in bf16, and ComfyUI reports the text model's missing ``logit_scale`` when loading it.
The two are written here as the hub has them; lite models go to ``*_lite`` files, which
ComfyUI recognises by the shapes above. Files written here also record each model's
configuration in the metadata (``cascade_codec.config.<component>``), so tiny or
non-released configurations read back exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from typing import Any, Mapping

import torch

from .. import weights as W
from .diffusers import plan_to_official
from .official import TITLES, Located, kind_of

UNET = "model.diffusion_model."
TEXT = "text_encoder.clip_g.transformer."
TEXT_PROJECTION = "text_encoder.clip_g.text_projection"
HF_TEXT_PROJECTION = "text_projection.weight"
PREFIXES = {"stage_a": "vae.", "effnet": "vae.encoder.", "previewer": "vae.previewer.", "text_encoder": TEXT,
            "image_encoder": "clip_l_vision."}
# Parameters of ComfyUI's modules that ours do not have (constants there), dropped when reading.
COMFY_ONLY = ("vae.encoder.mean", "vae.encoder.std", "text_encoder.clip_g.logit_scale")
FILES = {"stage_c_large": "stable_cascade_stage_c.safetensors",
         "stage_c_lite": "stable_cascade_stage_c_lite.safetensors",
         "stage_b_large": "stable_cascade_stage_b.safetensors",
         "stage_b_lite": "stable_cascade_stage_b_lite.safetensors"}
HUB_FOLDER = "comfyui_checkpoints"  # where the hub repo keeps them
# What each file holds besides its Stage B or C, in the order written.
CONTENTS = {"stage_c": ("text_encoder", "effnet", "previewer", "image_encoder"),
            "stage_b": ("stage_a", "text_encoder")}
META_CONFIG = W.META_CONFIG + "."
_SIZES = {"stage_c": ("clip_txt_mapper.weight", 0, {2048: "large", 1536: "lite"}),
          "stage_b": ("down_blocks.1.0.channelwise.0.weight", -1, {640: "large", 576: "lite"})}
_MARKERS = {"stage_c": "clip_txt_mapper.weight", "stage_b": "clip_mapper.weight"}


def prefix_of(component: str) -> str:
    """The key prefix of a component in a ComfyUI checkpoint."""
    return UNET if kind_of(component) in ("stage_b", "stage_c") else PREFIXES[component]


def file_holding(component: str) -> str:
    """The ComfyUI file (as the hub names it) that holds ``component``."""
    if component in FILES:
        return FILES[component]
    return FILES["stage_b_large" if component == "stage_a" else "stage_c_large"]




# --------------------------------------------------------------------------------------------- what a file holds
def model_component(header: W.SafetensorsHeader) -> str | None:
    """``stage_c_large`` etc. for the diffusion model of a ComfyUI checkpoint, ``None`` if it holds none.

    The size comes from our metadata if the file has it, else from the shapes ComfyUI itself uses.
    """
    keys = header.tensors
    if UNET + "clf.1.weight" not in keys:
        return None
    kind = next((k for k, marker in _MARKERS.items() if UNET + marker in keys), None)
    if kind is None:
        return None
    declared = [f"{kind}_{size}" for size in ("lite", "large") if f"{META_CONFIG}{kind}_{size}" in header.metadata]
    if declared:
        return declared[0]
    key, dim, sizes = _SIZES[kind]
    info = keys.get(UNET + key)
    size = sizes.get(info.shape[dim]) if info is not None else None
    if size is None:
        shape = list(info.shape) if info is not None else "missing"
        raise W.WeightsError(f"{header.path} holds a {TITLES[kind]} of neither released size ({UNET}{key}: {shape}; "
                             f"{' or '.join(str(n) for n in sizes)} expected) and no cascade-codec configuration, so "
                             "its hyper-parameters are unknown; convert it from the files it was made from instead.")
    return f"{kind}_{size}"


def components(header: W.SafetensorsHeader) -> list[str]:
    """The components a ComfyUI checkpoint holds (empty for any other file)."""
    found = []
    model = model_component(header)
    if model is not None:
        found.append(model)
    keys = header.tensors
    if "vae.vquantizer.codebook.weight" in keys:
        found.append("stage_a")
    for component in ("effnet", "previewer", "text_encoder", "image_encoder"):
        if any(k.startswith(PREFIXES[component]) for k in keys):
            found.append(component)
    return found


def candidate_files(src: W.WeightSource) -> list[str]:
    """ComfyUI checkpoints of ``src``: the pinned file, then the known names at the root and in
    ``comfyui_checkpoints/`` (the hub repo's place for them)."""
    names = [name for base in FILES.values() for name in (base, f"{HUB_FOLDER}/{base}") if src.has(name)]
    return ([src.pinned] if src.pinned else []) + [n for n in names if n != src.pinned]


def locate_all(src: W.WeightSource, component: str) -> list[Located]:
    """Every ComfyUI checkpoint of ``src`` holding ``component``."""
    found = []
    for name in candidate_files(src):
        header = src.header(name)
        if component in components(header):
            found.append(Located(component, "comfyui", _variant(header, component), (name,)))
    return found


def _variant(header: W.SafetensorsHeader, component: str) -> str:
    prefix = prefix_of(component)
    floats = {i.dtype for k, i in header.tensors.items() if k.startswith(prefix) and i.dtype.is_floating_point}
    return "bf16" if floats == {torch.bfloat16} else "fp32"


# --------------------------------------------------------------------------------------------- key plans
def _whole(key: str, shape: tuple[int, ...], transpose: bool = False) -> tuple[tuple[int, ...], list[W.Part]]:
    return (tuple(shape[::-1]) if transpose else tuple(shape)), [W.Part(key, 0, math.prod(shape), transpose)]


def _in_section(key: str, component: str) -> bool:
    if key in COMFY_ONLY or not key.startswith(prefix_of(component)):
        return False
    # Stage A's "vae." must not swallow the encoder's and the Previewer's deeper prefixes.
    return component != "stage_a" or not key.startswith((PREFIXES["effnet"], PREFIXES["previewer"]))


def plan_from_comfyui(shapes: Mapping[str, tuple[int, ...]], component: str, where: str = "the file") -> W.KeyPlan:
    """ComfyUI checkpoint keys → our keys (official names; transformers' names for the CLIP encoders) for
    ``component``. Split attention (``attn.to_q/k/v``, as ComfyUI saves) is packed back into ``in_proj``."""
    plan: W.KeyPlan = {}
    for key, shape in shapes.items():
        if component == "text_encoder" and key == TEXT_PROJECTION:
            plan[HF_TEXT_PROJECTION] = _whole(key, shape, transpose=True)
        elif _in_section(key, component):
            plan[key[len(prefix_of(component)):]] = _whole(key, shape)
    kind = kind_of(component)
    if kind not in ("stage_b", "stage_c") or not any(".attention.attn.to_q." in k for k in plan):
        return plan
    # ComfyUI's split names are diffusers' with an extra ".attn": rename, pack as for diffusers, point back.
    origin = {k.replace(".attention.attn.to_", ".attention.to_"): parts[0].key for k, (_, parts) in plan.items()}
    renamed = {k.replace(".attention.attn.to_", ".attention.to_"): shape for k, (shape, _) in plan.items()}
    packed = plan_to_official(renamed, kind, where)
    return {k: (shape, [replace(p, key=origin[p.key]) for p in parts]) for k, (shape, parts) in packed.items()}


def plan_to_comfyui(shapes: Mapping[str, tuple[int, ...]], component: str) -> W.KeyPlan:
    """Our keys of ``component`` → its keys in a ComfyUI checkpoint (the hub file's names)."""
    prefix = prefix_of(component)
    return {(TEXT_PROJECTION if component == "text_encoder" and key == HF_TEXT_PROJECTION else prefix + key):
            _whole(key, shape, transpose=component == "text_encoder" and key == HF_TEXT_PROJECTION)
            for key, shape in shapes.items()}


# --------------------------------------------------------------------------------------------- configurations
def stored_config(header: W.SafetensorsHeader, component: str) -> dict[str, Any] | None:
    """The configuration of ``component`` that cascade-codec recorded in the file, if any."""
    raw = header.metadata.get(META_CONFIG + component)
    return json.loads(raw) if raw else None


def _count(shapes: Mapping[str, Any], pattern: str) -> int:
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def clip_config(shapes: Mapping[str, tuple[int, ...]], component: str) -> dict[str, Any]:
    """transformers config arguments of the CLIP text (OpenCLIP ViT-bigG/14) or image (OpenAI ViT-L/14) encoder
    with these (transformers-named) shapes. Widths and depths come from the shapes; what shapes cannot tell is
    that of the released models: 64-wide heads, GELU (bigG) / quick-GELU (ViT-L), ids 49406/49407 at the end of
    the vocabulary."""
    layer = "text_model.encoder.layers.{}.mlp.fc1.weight" if component == "text_encoder" else \
        "vision_model.encoder.layers.{}.mlp.fc1.weight"
    common = dict(num_hidden_layers=_count(shapes, layer), intermediate_size=shapes[layer.format(0)][0],
                  layer_norm_eps=1e-5)
    if component == "text_encoder":
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        return dict(common, vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // 64),
                    max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0],
                    projection_dim=shapes[HF_TEXT_PROJECTION][0], hidden_act="gelu",
                    bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1)
    width, channels, patch, _ = shapes["vision_model.embeddings.patch_embedding.weight"]
    positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
    return dict(common, hidden_size=width, num_attention_heads=max(1, width // 64), num_channels=channels,
                patch_size=patch, image_size=patch * math.isqrt(positions - 1),
                projection_dim=shapes["visual_projection.weight"][0], hidden_act="quick_gelu")


_HF_CLASSES = {"text_encoder": ("clip_text_model", "CLIPTextModelWithProjection"),
               "image_encoder": ("clip_vision_model", "CLIPVisionModelWithProjection")}


def hf_config_json(component: str, config: Mapping[str, Any]) -> str:
    """The ``config.json`` of a CLIP encoder folder: the stored one as it was, or a derived one made loadable by
    transformers' ``from_pretrained``."""
    model_type, architecture = _HF_CLASSES[component]
    return json.dumps({"model_type": model_type, "architectures": [architecture], **config}, indent=2)


# --------------------------------------------------------------------------------------------- reading
def open_section(src: W.WeightSource, loc: Located) -> tuple[W.Checkpoint, dict[str, Any] | None]:
    """The tensors of one component of a ComfyUI checkpoint under our keys, and its configuration in our
    names (``None``: the preset its size names applies; the CLIP encoders always get one)."""
    header = src.header(loc.files[0])
    ckpt = W.Checkpoint.from_header(header)
    mapped = ckpt.remap(plan_from_comfyui(ckpt.shapes(), loc.component, str(header.path)))
    config = stored_config(header, loc.component)
    if config is None and loc.component in ("text_encoder", "image_encoder"):
        config = clip_config(mapped.shapes(), loc.component)
    return mapped, config




def hf_root(src: W.WeightSource) -> str | os.PathLike:
    """Where to look for the Hugging Face folders (``tokenizer/``, …) that go with a ComfyUI checkpoint: its
    folder, or the repo root above ``comfyui_checkpoints/``."""
    if src.folder is None:
        return src.repo_id
    if src.folder.name == HUB_FOLDER and not (src.folder / "tokenizer").is_dir():
        return src.folder.parent
    return src.folder


