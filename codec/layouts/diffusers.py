"""The diffusers layout of Stable Cascade and the mapping between it and the official one.

*Official* layout: flat files at the root (``stage_a.safetensors``,
``stage_b_lite_bf16.safetensors``, ``stage_c.safetensors``, …) with the official module
names, which are ours. *diffusers* layout: one folder per model (``vqgan/``,
``decoder_lite/``, ``decoder/``, ``prior_lite/``, ``prior/``) with ``config.json`` and
``diffusion_pytorch_model[.bf16].safetensors`` (or shards and an index), in the naming of
diffusers' ``StableCascadeUNet`` and ``PaellaVQModel``. The Hugging Face repo
``stabilityai/stable-cascade`` holds both; ``stable-cascade-prior`` only the second.
*ComfyUI* layout: all-in-one single files (``stable_cascade_stage_c.safetensors``: Stage C,
CLIP-G, the EfficientNet encoder, the Previewer, CLIP-L vision; ``stable_cascade_stage_b.safetensors``:
Stage B, Stage A, CLIP-G), each model under its key prefix; see :mod:`codec.layouts.comfyui`.

The key mapping was read off diffusers' ``StableCascadeUNet`` / ``PaellaVQModel`` and
its single-file converter, and is checked by the tests against the state dicts of the
real diffusers classes:

* attention: packed ``<blk>.attention.attn.in_proj_{weight,bias}`` (q, k, v stacked on
  dim 0) ↔ ``<blk>.attention.to_{q,k,v}.{weight,bias}``; ``attn.out_proj.*`` ↔ ``to_out.0.*``;
* Stage B: ``clip_mapper.*`` ↔ ``clip_txt_pooled_mapper.*`` (Stage C has that name already);
* Stage A: ``vquantizer.codebook.weight`` ↔ ``vquantizer.embedding.weight``;
* every other key is the same in both.

A mapping is a :data:`~codec.weights.KeyPlan` over shapes only, so it applies without
reading data, to a file being streamed (:meth:`~codec.weights.Checkpoint.remap`) as
well as to a state dict in memory (:func:`apply_plan`).

The VQGAN in diffusers' ``vqgan/`` on the hub is Würstchen v2's (``scale_factor``
0.3764), not the official Stage A (0.43); each Stage A is used with the scale factor
its own config names.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import torch

from .. import weights as W
from .official import Located

DIFFUSERS_FOLDERS = {"stage_a": "vqgan", "stage_b_lite": "decoder_lite", "stage_b_large": "decoder",
                     "stage_c_lite": "prior_lite", "stage_c_large": "prior"}
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = {"fp32": "diffusion_pytorch_model.safetensors", "bf16": "diffusion_pytorch_model.bf16.safetensors"}
DIFFUSERS_INDEX = {"fp32": "diffusion_pytorch_model.safetensors.index.json",
                   "bf16": "diffusion_pytorch_model.safetensors.index.bf16.json"}
# The CLIP encoders' folders of the hub repos (transformers' save_pretrained layout).
HF_FOLDERS = {"text_encoder": "text_encoder", "image_encoder": "image_encoder"}
HF_WEIGHTS = {"fp32": "model.safetensors"}
HF_INDEX = {"fp32": "model.safetensors.index.json"}


# --------------------------------------------------------------------------------------------- key mapping
_QKV = ("to_q", "to_k", "to_v")
_RENAMES = {  # official → diffusers, besides attention
    "stage_a": {"vquantizer.codebook.weight": "vquantizer.embedding.weight"},
    "stage_b": {"clip_mapper.weight": "clip_txt_pooled_mapper.weight",
                "clip_mapper.bias": "clip_txt_pooled_mapper.bias"},
    "stage_c": {},
}


def _whole(key: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[W.Part]]:
    return tuple(shape), [W.Part(key, 0, math.prod(shape))]


def plan_to_diffusers(shapes: Mapping[str, tuple[int, ...]], kind: str) -> W.KeyPlan:
    """Official key → diffusers key plan for a ``kind`` model with these official keys and shapes.

    Keys come out in the order of the diffusers module (``to_q.weight, to_q.bias, to_k.weight, …``).
    """
    plan: W.KeyPlan = {}
    renames = _RENAMES[kind]
    for key, shape in shapes.items():
        base, sep, leaf = key.rpartition(".attention.attn.")
        if sep and leaf in ("in_proj_weight", "in_proj_bias"):
            if f"{base}.attention.to_q.{leaf[len('in_proj_'):]}" in plan:
                continue
            prefix = key[:-len(leaf)]
            packed = [k for k in (f"{prefix}in_proj_weight", f"{prefix}in_proj_bias") if k in shapes]
            for i, name in enumerate(_QKV):
                for k in packed:
                    third = math.prod(shapes[k]) // 3
                    plan[f"{base}.attention.{name}.{k.rsplit('_', 1)[1]}"] = (
                        (shapes[k][0] // 3, *shapes[k][1:]), [W.Part(k, i * third, third)])
        elif sep and leaf.startswith("out_proj."):
            plan[f"{base}.attention.to_out.0.{leaf[len('out_proj.'):]}"] = _whole(key, shape)
        else:
            plan[renames.get(key, key)] = _whole(key, shape)
    return plan


def plan_to_official(shapes: Mapping[str, tuple[int, ...]], kind: str, where: str = "the checkpoint") -> W.KeyPlan:
    """diffusers key → official key plan (q, k, v are packed back into ``in_proj``, in that order)."""
    plan: W.KeyPlan = {}
    renames = {v: k for k, v in _RENAMES[kind].items()}
    for key, shape in shapes.items():
        base, sep, rest = key.rpartition(".attention.")
        name, _, leaf = rest.partition(".")
        if sep and name in _QKV:
            if f"{base}.attention.attn.in_proj_{leaf}" in plan:
                continue
            for which in [x for x in ("weight", "bias") if f"{base}.attention.to_q.{x}" in shapes]:
                keys = [f"{base}.attention.{q}.{which}" for q in _QKV]
                if any(k not in shapes for k in keys) or len({tuple(shapes[k]) for k in keys}) != 1:
                    raise W.WeightsError(f"{where}: the attention projections {', '.join(keys)} are incomplete or of "
                                         "different shapes, so they cannot be packed into in_proj; the file is "
                                         "damaged or not a Stable Cascade checkpoint.")
                q_shape = tuple(shapes[keys[0]])
                plan[f"{base}.attention.attn.in_proj_{which}"] = (
                    (3 * q_shape[0], *q_shape[1:]), [W.Part(k, 0, math.prod(q_shape)) for k in keys])
        elif sep and name == "to_out" and leaf.startswith("0."):
            plan[f"{base}.attention.attn.out_proj.{leaf[2:]}"] = _whole(key, shape)
        else:
            plan[renames.get(key, key)] = _whole(key, shape)
    return plan


def apply_plan(state: Mapping[str, torch.Tensor], plan: W.KeyPlan) -> dict[str, torch.Tensor]:
    """A key plan applied to an in-memory state dict (whole tensors are passed through, not copied)."""
    out = {}
    for key, (shape, parts) in plan.items():
        chunks = [state[p.key].reshape(-1)[p.offset:p.offset + p.numel] for p in parts]
        out[key] = (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).view(shape)
    return out


def state_dict_to_diffusers(state: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Our/official state dict of a ``kind`` model → the state dict of the diffusers class."""
    return apply_plan(state, plan_to_diffusers({k: tuple(v.shape) for k, v in state.items()}, kind))


def state_dict_to_official(state: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A diffusers state dict of a ``kind`` model → our/official state dict."""
    return apply_plan(state, plan_to_official({k: tuple(v.shape) for k, v in state.items()}, kind))


# --------------------------------------------------------------------------------------------- configs
_BLOCK_NAMES = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}
_BLOCK_LETTERS = {v: k for k, v in _BLOCK_NAMES.items()}
_UNET_COMMON = {  # ours → diffusers
    "c_in": "in_channels", "c_out": "out_channels", "c_r": "timestep_ratio_embedding_dim", "patch_size": "patch_size",
    "c_cond": "conditioning_dim", "c_hidden": "block_out_channels", "c_clip_seq": "clip_seq",
    "kernel_size": "kernel_size", "dropout": "dropout", "self_attn": "self_attn",
    "t_conds": "timestep_conditioning_type",
}
_UNET_BY_KIND = {
    "stage_b": {"c_clip": "clip_text_pooled_in_channels", "c_effnet": "effnet_in_channels",
                "c_pixels": "pixel_mapper_in_channels"},
    "stage_c": {"c_clip_text": "clip_text_in_channels", "c_clip_text_pooled": "clip_text_pooled_in_channels",
                "c_clip_img": "clip_image_in_channels", "switch_level": "switch_level"},
}
_UNSET_BY_KIND = {  # diffusers options our class of that kind does not have
    "stage_b": ("clip_text_in_channels", "clip_image_in_channels", "switch_level"),
    "stage_c": ("effnet_in_channels", "pixel_mapper_in_channels"),
}
_PAELLA = {"levels": "levels", "bottleneck_blocks": "bottleneck_blocks", "c_hidden": "embed_dim",
           "c_latent": "latent_channels", "codebook_size": "num_vq_embeddings", "scale_factor": "scale_factor"}
_PAELLA_FIXED = {"in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2}


def config_to_diffusers(kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Our (official-named) constructor arguments → the diffusers ``config.json`` of the same model."""
    if kind == "stage_a":
        return {"_class_name": "PaellaVQModel", **_PAELLA_FIXED,
                **{theirs: config[ours] for ours, theirs in _PAELLA.items()}}
    bad = [letter for level in config["level_config"] for letter in level if letter not in _BLOCK_NAMES]
    if bad:
        raise W.WeightsError(f"block type(s) {sorted(set(bad))} of this {kind} have no diffusers equivalent.")
    out: dict[str, Any] = {"_class_name": "StableCascadeUNet"}
    out.update({theirs: config[ours] for ours, theirs in {**_UNET_COMMON, **_UNET_BY_KIND[kind]}.items()})
    out.update({name: None for name in _UNSET_BY_KIND[kind]})
    out["num_attention_heads"] = [max(0, h) for h in config["nhead"]]  # official -1 = no attention; diffusers 0
    out["down_num_layers_per_block"], out["up_num_layers_per_block"] = config["blocks"]
    out["down_blocks_repeat_mappers"], out["up_blocks_repeat_mappers"] = config["block_repeat"]
    out["block_types_per_layer"] = [[_BLOCK_NAMES[c] for c in level] for level in config["level_config"]]
    return out


def config_from_diffusers(kind: str, config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A diffusers ``config.json`` → our (official-named) constructor arguments; refuses what we cannot build."""
    def need(names):
        missing = [n for n in names if n not in config]
        if missing:
            raise W.WeightsError(f"{where} has no {', '.join(missing)}; it is not a complete diffusers config of a "
                                 f"{'PaellaVQModel' if kind == 'stage_a' else 'StableCascadeUNet'} (re-download it).")

    if kind == "stage_a":
        need(list(_PAELLA.values()) + list(_PAELLA_FIXED))
        odd = {k: config[k] for k, v in _PAELLA_FIXED.items() if config[k] != v}
        if odd:
            raise W.WeightsError(f"{where}: {odd} is not supported (Stage A has 3 image channels and scale 2 stages).")
        return {ours: config[theirs] for ours, theirs in _PAELLA.items()}
    names = {**_UNET_COMMON, **_UNET_BY_KIND[kind]}
    need(list(names.values()) + ["num_attention_heads", "down_num_layers_per_block", "up_num_layers_per_block",
                                 "down_blocks_repeat_mappers", "up_blocks_repeat_mappers", "block_types_per_layer"])
    present = [n for n in _UNSET_BY_KIND[kind] if config.get(n) is not None]
    absent = [n for n in names.values() if config[n] is None and n != "switch_level"]
    if present or absent:
        raise W.WeightsError(f"{where} describes a StableCascadeUNet that is not a {kind.replace('_', ' ').title()} "
                             f"({', '.join(present)} set, {', '.join(absent) or 'nothing'} unset); is it in the right "
                             "folder (decoder*/ = Stage B, prior*/ = Stage C)?")
    out = {ours: config[theirs] for ours, theirs in names.items()}
    out["nhead"] = [h if h > 0 else -1 for h in config["num_attention_heads"]]
    out["blocks"] = [list(config["down_num_layers_per_block"]), list(config["up_num_layers_per_block"])]
    out["block_repeat"] = [list(config["down_blocks_repeat_mappers"]), list(config["up_blocks_repeat_mappers"])]
    try:
        out["level_config"] = ["".join(_BLOCK_LETTERS[b] for b in level) for level in config["block_types_per_layer"]]
    except KeyError as e:
        raise W.WeightsError(f"{where}: block type {e.args[0]!r} is not one of {sorted(_BLOCK_LETTERS)}.") from None
    for key in ("c_hidden", "dropout", "t_conds"):
        if isinstance(out[key], (list, tuple)):
            out[key] = list(out[key])
    return out


def diffusers_class(kind: str) -> type:
    """diffusers' class for a ``kind`` model: ``PaellaVQModel`` or ``StableCascadeUNet`` (needs diffusers)."""
    if kind != "stage_a":
        from diffusers import StableCascadeUNet

        return StableCascadeUNet
    try:  # moved under pipelines/deprecated/ in 2026
        from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    except ImportError:
        from diffusers.pipelines.wuerstchen import PaellaVQModel
    return PaellaVQModel


def diffusers_model(kind: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """diffusers' model with the hyper-parameters of our ``config`` (honours an enclosing ``torch.device``)."""
    return diffusers_class(kind)(**{k: v for k, v in config_to_diffusers(kind, config).items()
                                    if not k.startswith("_")})






def diffusers_variant(src: W.WeightSource, component: str, variant: str) -> Located | None:
    """``component``'s ``variant`` in ``src``'s diffusers (or Hugging Face) folder: one file or shards."""
    hf = component in HF_FOLDERS
    folder = (HF_FOLDERS if hf else DIFFUSERS_FOLDERS)[component]
    config = f"{folder}/{DIFFUSERS_CONFIG}"
    single = f"{folder}/{(HF_WEIGHTS if hf else DIFFUSERS_WEIGHTS)[variant]}"
    if src.has(single):
        return Located(component, "diffusers", variant, (single,), config)
    index = f"{folder}/{(HF_INDEX if hf else DIFFUSERS_INDEX)[variant]}"
    if not src.has(index):
        return None
    try:
        weight_map = json.loads(src.path(index).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise W.WeightsError(f"{src.source}/{index} is not a valid shard index (no weight_map); download it "
                             "again.") from None
    shards = tuple(f"{folder}/{name}" for name in dict.fromkeys(weight_map.values()))
    return Located(component, "diffusers", variant, shards, config)


def has_diffusers_layout(src: W.WeightSource) -> bool:
    """Whether ``src`` holds any model folder of the diffusers layout (``vqgan/``, ``decoder*/``, ``prior*/``)."""
    return any(src.has(f"{folder}/{DIFFUSERS_CONFIG}") for folder in DIFFUSERS_FOLDERS.values())
