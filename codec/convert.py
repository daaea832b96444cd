"""``cascade convert``: rewrite Stable Cascade weights in the official or the diffusers layout.

Every model found in the source (either layout, see :mod:`codec.interop`) is written
tensor by tensor through :func:`codec.weights.write_checkpoint`: the keys are mapped
without reading data, and the bytes are copied (or cast) 16 MiB at a time, so
converting the 3.6B prior takes no more memory than that. Converting back gives
bit-identical tensors (``--dtype keep``). Output files are written atomically and
existing ones are skipped, so an interrupted run continues where it stopped.

The EfficientNet encoder, the Previewer and the cached empty-caption embedding exist
only as official files; they are copied to the root in both layouts, as the hub repo
does. The Hugging Face folders (``text_encoder/``, ``tokenizer/``, …) are copied as they
are. ``--dtype`` applies to Stage B and Stage C; Stage A, like the other fp32-only
releases, is written as stored.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import interop
from . import weights as W

LAYOUTS = ("official", "diffusers")
DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}
ROOT_FILES = (W.EFFNET_FILE, W.PREVIEWER_FILE, W.EMPTY_CAPTION_FILE)
HF_FOLDERS = ("text_encoder", "tokenizer", "image_encoder", "feature_extractor")
DIFFUSERS_ONLY = ("scheduler", "model_index.json")


@dataclass
class ConvertJob:
    """One model variant to write: where it comes from, where it goes, in which keys and dtype."""

    source: interop.Located
    target: Path
    ckpt: W.Checkpoint
    dtype: torch.dtype | None
    metadata: dict[str, str]
    config: dict[str, Any]
    diffusers_config: dict[str, Any] | None = None

    def nbytes(self) -> int:
        """Size of the tensor data to write."""
        return sum(t.numel * (self.dtype if self.dtype is not None and t.dtype.is_floating_point else t.dtype).itemsize
                   for t in self.ckpt.tensors.values())


def _variant(ckpt: W.Checkpoint, dtype: torch.dtype | None, label: str) -> str:
    floats = {dtype} if dtype is not None else {d for d in ckpt.dtypes() if d.is_floating_point}
    for name, d in interop.VARIANT_DTYPES.items():
        if floats == {d}:
            return name
    raise W.WeightsError(f"{label} holds {', '.join(sorted(str(d).replace('torch.', '') for d in floats))} tensors, "
                         "which neither layout has a file name for; pass --dtype bf16 or --dtype fp32.")


def _job(src: W.WeightSource, loc: interop.Located, dst: Path, to: str, dtype: torch.dtype | None) -> ConvertJob:
    ckpt, stored = interop.open_component(src, loc)
    kind = interop.kind_of(loc.component)
    if kind == "stage_a":
        dtype = None  # released in fp32 only; the official code runs it in fp32
    config = {**interop.default_config(loc.component), **(stored or {})}
    variant = _variant(ckpt, dtype, loc.label)
    note = ckpt.metadata.get(W.META_NOTE)
    metadata = {"format": "pt", **({W.META_NOTE: note} if note else {})}
    if to == "official":
        names = interop.OFFICIAL_FILES[loc.component]
        target = dst / names.get(variant, names["fp32"])
        return ConvertJob(loc, target, ckpt, dtype, {**metadata, W.META_CONFIG: json.dumps(config)}, config)
    folder = dst / interop.DIFFUSERS_FOLDERS[loc.component]
    return ConvertJob(loc, folder / interop.DIFFUSERS_WEIGHTS[variant],
                      ckpt.remap(interop.plan_to_diffusers(ckpt.shapes(), kind)), dtype, metadata, config,
                      interop.config_to_diffusers(kind, config))


def plan_conversion(src: W.WeightSource, dst: Path, to: str, dtype: torch.dtype | None,
                    log: Callable[[str], None]) -> list[ConvertJob]:
    """The jobs converting every model of ``src``. A model present in both layouts is taken from the one already
    in the target layout (the hub repo's ``vqgan/`` is a different VQGAN than its ``stage_a.safetensors``).
    With ``dtype`` set, one variant per model is written (the one stored in that dtype if present); with
    ``None`` every variant is."""
    jobs = []
    for component in interop.COMPONENTS:
        found = interop.locate_all(src, component)
        same = [loc for loc in found if loc.layout == to]
        other = [loc for loc in found if loc.layout != to]
        if same and other:
            log(f"{component}: {', '.join(loc.label for loc in same)} is already in the {to} layout; "
                f"{', '.join(loc.label for loc in other)} is not converted")
        pool = same or other
        if dtype is not None and pool and interop.kind_of(component) != "stage_a":
            wanted = [loc for loc in pool if interop.VARIANT_DTYPES[loc.variant] == dtype]
            pool = wanted[:1] or pool[:1]
        for loc in pool:
            jobs.append(_job(src, loc, dst, to, dtype))
            if component == "stage_a":
                log(f"{loc.label}: {interop.describe_stage_a(jobs[-1].config['scale_factor'])}; the converted "
                    "Stage A keeps it")
    return jobs


def _copy_extras(src: W.WeightSource, dst: Path, to: str, overwrite: bool, log: Callable[[str], None]) -> int:
    copied = 0
    for name in ROOT_FILES:
        if not src.has(name) or ((dst / name).exists() and (not overwrite or src.path(name).samefile(dst / name))):
            continue
        shutil.copyfile(src.path(name), dst / name)
        copied += 1
    folders = HF_FOLDERS + (DIFFUSERS_ONLY if to == "diffusers" else ())
    if src.folder is None:
        log(f"{', '.join(f + '/' for f in HF_FOLDERS)} of a repo id are not copied; download them with "
            f"`hf download {src.repo_id} --include 'text_encoder/*' 'tokenizer/*' --local-dir {dst}`")
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
    """Convert every Stable Cascade model in ``source`` (folder or repo id, either layout) into ``dest`` in the
    ``to`` layout (``"official"`` or ``"diffusers"``), floats of Stage B/C cast to ``dtype``
    (``"keep"``, ``"bf16"``, ``"fp32"``). Existing outputs are skipped unless ``overwrite``."""
    from tqdm.auto import tqdm

    if to not in LAYOUTS:
        raise ValueError(f"to must be one of {', '.join(LAYOUTS)}, got {to!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src, dst = W.WeightSource(source), Path(dest)
    jobs = plan_conversion(src, dst, to, DTYPES[dtype], log)
    if not jobs:
        raise W.WeightsError(f"{source} holds no Stage A, B or C weights in either layout (official files like "
                             f"{W.STAGE_A_FILE}, or diffusers folders like vqgan/ and decoder_lite/ with config.json).")
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
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", dynamic_ncols=True,
              disable=None if progress else True) as bar:
        for job in jobs:
            if job.diffusers_config is not None and (overwrite or not (job.target.parent / "config.json").exists()):
                job.target.parent.mkdir(parents=True, exist_ok=True)
                (job.target.parent / interop.DIFFUSERS_CONFIG).write_text(json.dumps(job.diffusers_config, indent=2))
            if id(job) not in todo:
                continue
            bar.set_postfix_str(f"{job.source.label} → {job.target.relative_to(dst)}", refresh=False)
            W.write_checkpoint(job.ckpt, job.target, job.dtype, job.metadata, progress=bar.update)
            written.append(f"{job.source.label} → {job.target}")
    for line in written:
        log(f"  {line}")
    for line in skipped:
        log(f"  skipped {line}")
    copied = _copy_extras(src, dst, to, overwrite, log)
    return ConvertSummary(written, skipped, copied, total)
