"""``cascade convert``: rewrite Stable Cascade weights in the official, diffusers or ComfyUI layout.

Every model found in the source (any layout, see :mod:`codec.layouts`) is written tensor by
tensor through :func:`codec.weights.write_checkpoint`: the keys are mapped without reading
data, and the bytes are copied (or cast) 16 MiB at a time, so converting the 3.6B prior
takes no more memory than that. Converting back gives bit-identical tensors (``--dtype
keep``). Output files are written atomically and existing ones are skipped, so an
interrupted run continues where it stopped.

The EfficientNet encoder, the Previewer and the cached empty-caption embedding exist only as
official files (and inside ComfyUI's Stage C file); they are copied to the root in the
official and diffusers layouts, as the hub repo does. The Hugging Face folders
(``text_encoder/``, ``tokenizer/``, …) are copied as they are. ComfyUI's all-in-one files
(:mod:`codec.layouts.comfyui`) are assembled from all of these, and taken apart again. ``--dtype``
applies to Stage B and Stage C; everything else is written as stored.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import weights as W
from ..errors import UsageError
from . import comfyui, official
from . import diffusers as diffusers_layout
from . import locate as layouts

LAYOUTS = ("official", "diffusers", "comfyui")
DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}
ROOT_FILES = (W.EFFNET_FILE, W.PREVIEWER_FILE, W.EMPTY_CAPTION_FILE)
HF_FOLDERS = ("text_encoder", "tokenizer", "image_encoder", "feature_extractor")
DIFFUSERS_ONLY = ("scheduler", "model_index.json")
# Files and folders copied as they are, per target layout (ComfyUI's files hold the rest).
COPIED = {"official": ROOT_FILES + HF_FOLDERS, "diffusers": ROOT_FILES + HF_FOLDERS + DIFFUSERS_ONLY,
          "comfyui": (W.EMPTY_CAPTION_FILE, "tokenizer")}

DtypeRule = torch.dtype | None | Callable[[str], torch.dtype | None]


@dataclass
class ConvertJob:
    """One file to write: where its tensors come from, where it goes, in which keys and dtype."""

    label: str
    target: Path
    ckpt: W.Checkpoint
    dtype: DtypeRule
    metadata: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    side_files: dict[Path, str] = field(default_factory=dict)  # small text files that go with it (config.json)

    def dtype_of(self, key: str) -> torch.dtype | None:
        """Target dtype of the floats of tensor ``key`` (``None``: as stored)."""
        return self.dtype(key) if callable(self.dtype) else self.dtype

    def nbytes(self) -> int:
        """Size of the tensor data to write."""
        return sum(t.numel * ((self.dtype_of(k) or t.dtype) if t.dtype.is_floating_point else t.dtype).itemsize
                   for k, t in self.ckpt.tensors.items())


def _variant(ckpt: W.Checkpoint, dtype: torch.dtype | None, label: str) -> str:
    floats = {dtype} if dtype is not None else {d for d in ckpt.dtypes() if d.is_floating_point}
    for name, d in official.VARIANT_DTYPES.items():
        if floats == {d}:
            return name
    raise W.WeightsError(f"{label} holds {', '.join(sorted(str(d).replace('torch.', '') for d in floats))} tensors, "
                         "which no layout has a file name for; pass --dtype bf16 or --dtype fp32.")


def _metadata(ckpt: W.Checkpoint, **extra: str) -> dict[str, str]:
    note = ckpt.metadata.get(W.META_NOTE)
    return {"format": "pt", **({W.META_NOTE: note} if note else {}), **extra}


def _job(src: W.WeightSource, loc: official.Located, dst: Path, to: str, dtype: torch.dtype | None) -> ConvertJob:
    ckpt, stored = layouts.open_component(src, loc)
    kind = official.kind_of(loc.component)
    if kind == "stage_a":
        dtype = None  # released in fp32 only; the official code runs it in fp32
    config = {**official.default_config(loc.component), **(stored or {})}
    variant = _variant(ckpt, dtype, loc.label)
    if to == "official":
        names = official.OFFICIAL_FILES[loc.component]
        target = dst / names.get(variant, names["fp32"])
        return ConvertJob(loc.label, target, ckpt, dtype, _metadata(ckpt, **{W.META_CONFIG: json.dumps(config)}),
                          config)
    folder = dst / diffusers_layout.DIFFUSERS_FOLDERS[loc.component]
    return ConvertJob(loc.label, folder / diffusers_layout.DIFFUSERS_WEIGHTS[variant],
                      ckpt.remap(diffusers_layout.plan_to_diffusers(ckpt.shapes(), kind)), dtype, _metadata(ckpt), config,
                      {folder / diffusers_layout.DIFFUSERS_CONFIG: json.dumps(diffusers_layout.config_to_diffusers(kind, config),
                                                                     indent=2)})


def _unbundle_job(src: W.WeightSource, loc: official.Located, dst: Path) -> ConvertJob:
    """A part of a ComfyUI checkpoint that is not a diffusion model, written as the official file (encoder,
    Previewer) or the Hugging Face folder (CLIP encoders) it stands for."""
    ckpt, config = layouts.open_component(src, loc)
    if loc.component in official.ROOT_FILES:
        extra = {W.META_CONFIG: json.dumps(config)} if config else {}
        return ConvertJob(loc.label, dst / official.ROOT_FILES[loc.component], ckpt, None, _metadata(ckpt, **extra))
    folder = dst / diffusers_layout.HF_FOLDERS[loc.component]
    return ConvertJob(loc.label, folder / diffusers_layout.HF_WEIGHTS["fp32"], ckpt, None, {"format": "pt"}, config,
                      {folder / diffusers_layout.DIFFUSERS_CONFIG: comfyui.hf_config_json(loc.component, config)})


def _from_one_layout(src: W.WeightSource, found: list[official.Located], to: str, what: str,
                     log: Callable[[str], None]) -> list[official.Located]:
    """Of the variants ``found``, those in the target layout, else those of the first other layout; logs what is
    left out. A single file given as the source yields only what it holds."""
    if src.pinned:
        found = [loc for loc in found if loc.files[0] == src.pinned]
    same = [loc for loc in found if loc.layout == to]
    first = min((official.LAYOUT_ORDER[loc.layout] for loc in found), default=0)
    pool = same or [loc for loc in found if official.LAYOUT_ORDER[loc.layout] == first]
    left = [loc for loc in found if loc not in pool]
    if left:
        log(f"{what}: {', '.join(loc.label for loc in pool)} is converted"
            f"{f' (already in the {to} layout)' if same else ''}; {', '.join(loc.label for loc in left)} is not")
    return pool


def plan_conversion(src: W.WeightSource, dst: Path, to: str, dtype: torch.dtype | None,
                    log: Callable[[str], None]) -> list[ConvertJob]:
    """The jobs converting every model of ``src``. A model present in several layouts is taken from the one already
    in the target layout, else from the first of official, diffusers, ComfyUI (the hub repo's ``vqgan/`` is a
    different VQGAN than its ``stage_a.safetensors``). With ``dtype`` set, one variant per model is written (the
    one stored in that dtype if present); with ``None`` every variant is (ComfyUI: one file per model, fp32
    preferred)."""
    if to == "comfyui":
        return _comfyui_jobs(src, dst, dtype, log)
    jobs = []
    for component in official.COMPONENTS:
        if to != "official" and component not in diffusers_layout.DIFFUSERS_FOLDERS:
            if layouts.locate_all(src, component):
                log(f"{component}: cascade-codec's own model, which {to} has no layout for; not converted")
            continue
        pool = _from_one_layout(src, layouts.locate_all(src, component), to, component, log)
        if dtype is not None and pool and official.kind_of(component) != "stage_a":
            wanted = [loc for loc in pool if official.VARIANT_DTYPES[loc.variant] == dtype]
            pool = wanted[:1] or pool[:1]
        for loc in pool:
            jobs.append(_job(src, loc, dst, to, dtype))
            if component == "stage_a":
                log(f"{loc.label}: {official.describe_stage_a(jobs[-1].config['scale_factor'])}; the converted "
                    "Stage A keeps it")
    for component in official.EXTRA_COMPONENTS:  # an official file or Hugging Face folder is copied as it is
        found = _from_one_layout(src, layouts.locate_all(src, component), to, component, log)
        if found and found[0].layout == "comfyui":
            jobs.append(_unbundle_job(src, found[0], dst))
            copied = not src.pinned and src.folder is not None and (src.folder / "tokenizer").is_dir()
            if component == "text_encoder" and not copied:
                log(f"{found[0].files[0]} holds no tokenizer: put the tokenizer/ folder of {W.OFFICIAL_REPO} into "
                    f"{dst} (`hf download {W.OFFICIAL_REPO} --include 'tokenizer/*' --local-dir {dst}`)")
    return jobs


def _comfyui_jobs(src: W.WeightSource, dst: Path, dtype: torch.dtype | None,
                  log: Callable[[str], None]) -> list[ConvertJob]:
    """One all-in-one file per Stage B and Stage C model of ``src`` (fp32 variant preferred with ``dtype=None``)."""
    jobs = []
    for component in official.COMPONENTS:
        kind = official.kind_of(component)
        found = layouts.locate_all(src, component)
        if kind == "stage_a" or not found:
            continue
        if component not in comfyui.FILES:
            log(f"{component}: cascade-codec's own model, which ComfyUI has no layout for; not converted")
            continue
        if any(loc.layout == "comfyui" for loc in found):
            log(f"{component}: already in the ComfyUI layout ({found[-1].files[0]}); not converted")
            continue
        wanted = [loc for loc in found if official.VARIANT_DTYPES[loc.variant] == (dtype or torch.float32)]
        model = (wanted or found)[0]
        if len(found) > 1:
            others = ", ".join(other.label for other in found if other != model)
            log(f"{component}: {model.label} is converted; {others} is not (ComfyUI has one file per model)")
        parts = [(component, model)]
        for extra in comfyui.CONTENTS[kind]:
            loc = layouts.locate(src, extra, torch.float32)
            if loc is None:
                log(f"{comfyui.FILES[component]}: {src.source} has no {official.title(extra)}; the file goes "
                    "without it")
            else:
                parts.append((extra, loc))
        jobs.append(_bundle_job(src, parts, dst / comfyui.FILES[component], dtype, log))
    return jobs


def _bundle_job(src: W.WeightSource, parts: list[tuple[str, official.Located]], target: Path,
                dtype: torch.dtype | None, log: Callable[[str], None]) -> ConvertJob:
    """A ComfyUI checkpoint made of ``parts`` (component, where it is), with every part's configuration."""
    sections, metadata = [], {"format": "pt"}
    for component, loc in parts:
        ckpt, config = layouts.open_component(src, loc)
        if component in official.COMPONENTS:
            config = {**official.default_config(component), **(config or {})}
        if component == "stage_a" and config["scale_factor"] != official.OFFICIAL_STAGE_A_SCALE:
            log(f"{target.name}: {loc.label} has {official.describe_stage_a(config['scale_factor'])}; ComfyUI decodes "
                f"with {official.OFFICIAL_STAGE_A_SCALE} whatever the file says (cascade-codec reads the scale back)")
        if config:
            metadata[comfyui.META_CONFIG + component] = json.dumps(config)
        metadata.update(_metadata(ckpt))
        sections.append(ckpt.remap(comfyui.plan_to_comfyui(ckpt.shapes(), component)))
    ckpt = W.Checkpoint.union(sections, target)

    def dtype_of(key: str) -> torch.dtype | None:
        return dtype if key.startswith(comfyui.UNET) else None

    label = " + ".join(loc.label for _, loc in parts)
    return ConvertJob(label, target, ckpt, dtype_of, metadata)


def _copy_extras(src: W.WeightSource, dst: Path, to: str, overwrite: bool, log: Callable[[str], None]) -> int:
    """Copy the files and folders that the ``to`` layout keeps as they are; nothing when the source is one file."""
    if src.pinned:
        return 0
    copied = 0
    for name in (n for n in COPIED[to] if n in ROOT_FILES):
        if not src.has(name) or ((dst / name).exists() and (not overwrite or src.path(name).samefile(dst / name))):
            continue
        shutil.copyfile(src.path(name), dst / name)
        copied += 1
    folders = [n for n in COPIED[to] if n not in ROOT_FILES]
    if src.folder is None:
        hf = [f for f in folders if f in HF_FOLDERS]
        log(f"{', '.join(f + '/' for f in hf)} of a repo id are not copied; download them with "
            f"`hf download {src.repo_id} --include {' '.join(repr(f + '/*') for f in hf)} --local-dir {dst}`")
        return copied
    for name in folders:
        path = src.folder / name
        if not path.exists() or ((dst / name).exists() and not overwrite) or path.resolve() == (dst / name).resolve():
            continue
        if path.is_dir():
            shutil.copytree(path, dst / name, dirs_exist_ok=True)
        else:
            shutil.copyfile(path, dst / name)
        copied += 1
    return copied


@dataclass
class ConvertSummary:
    """What a conversion did."""

    written: list[str]
    skipped: list[str]
    copied: int
    bytes_written: int

    def line(self) -> str:
        """One line for the terminal."""
        return (f"converted {len(self.written)} model file(s) ({self.bytes_written / 2**20:.1f} MiB), "
                f"{len(self.skipped)} already there, {self.copied} other file(s)/folder(s) copied")


def convert(source: str | os.PathLike, dest: str | os.PathLike, to: str, dtype: str = "keep",
            overwrite: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> ConvertSummary:
    """Convert every Stable Cascade model in ``source`` (folder, repo id or ComfyUI file; any layout) into ``dest``
    in the ``to`` layout (``"official"``, ``"diffusers"`` or ``"comfyui"``), floats of Stage B/C cast to ``dtype``
    (``"keep"``, ``"bf16"``, ``"fp32"``). Existing outputs are skipped unless ``overwrite``."""
    from ..progress import progress_bar

    if to not in LAYOUTS:
        raise UsageError(f"to must be one of {', '.join(LAYOUTS)}, got {to!r}")
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src, dst = W.WeightSource(source), Path(dest)
    jobs = plan_conversion(src, dst, to, DTYPES[dtype], log)
    if not jobs:
        what = "Stage B or C weights to put in a ComfyUI file" if to == "comfyui" else "Stage A, B or C weights"
        raise W.WeightsError(f"{source} holds no {what} in any layout (official files like {W.STAGE_A_FILE}, "
                             "diffusers folders like vqgan/ and decoder_lite/ with config.json, or ComfyUI files like "
                             "stable_cascade_stage_b.safetensors).")
    inputs = {Path(p.header.path).resolve() for job in jobs for t in job.ckpt.tensors.values() for p in t.pieces}
    todo: dict[int, ConvertJob] = {}
    skipped = []
    for job in jobs:
        if job.target.resolve() in inputs:
            skipped.append(f"{job.target} (it is the source itself)")
        elif job.target.exists() and not overwrite:
            skipped.append(str(job.target))
        else:
            todo[id(job)] = job
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    total = sum(j.nbytes() for j in todo.values())
    with progress_bar(total, "convert", unit="B", enabled=None if progress else False, unit_scale=True,
                      unit_divisor=1024) as bar:
        for job in jobs:
            for path, text in job.side_files.items():
                if overwrite or not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(text)
            if id(job) not in todo:
                continue
            bar.set_postfix_str(f"{job.label} → {job.target.relative_to(dst)}", refresh=False)
            W.write_checkpoint(job.ckpt, job.target, job.dtype, job.metadata, progress=bar.update)
            written.append(f"{job.label} → {job.target}")
    for line in written:
        log(f"  {line}")
    for line in skipped:
        log(f"  skipped {line}")
    copied = _copy_extras(src, dst, to, overwrite, log)
    return ConvertSummary(written, skipped, copied, total)
