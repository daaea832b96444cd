"""``cascade info``, ``convert`` and ``demo-weights``: what a weights folder holds, layouts, tiny weights."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from ..errors import UsageError
from .common import RESUMES, user_errors


def describe_latents(path: Path) -> str:
    """What a latents file from `cascade encode` holds: count, shapes, bytes, model, sources and sizes."""
    from ..latents import load_latents

    found = load_latents(path)
    shapes = sorted({"×".join(map(str, z.shape[1:])) for z in found.latents})
    count = sum(z.shape[0] for z in found.latents)
    lines = [f"latents file: {path} ({path.stat().st_size:,} bytes)",
             f"  {count} latent(s) of shape {', '.join(shapes)}",
             f"  model: {found.model or 'not recorded'}; encoder scale: {found.encoder_scale or 'not recorded'}"]
    for i, source in enumerate(found.sources or []):
        size = f" ({found.sizes[i][1]}×{found.sizes[i][0]})" if found.sizes and i < len(found.sizes) else ""
        lines.append(f"  {i}: {source}{size}")
    return "\n".join(lines)


def _refuse_folder_without_weights(folder: Path, is_latent_store: Callable[[Path], bool]) -> None:
    """A :class:`UsageError` for a folder that is part of a latent store, or that holds images and no weights (the
    weights advice — "download these files into it" — would mislead); nothing for any other folder."""
    from ..latents import IMAGE_SUFFIXES

    store = next((p for p in list(folder.resolve().parents)[:4] if is_latent_store(p)), None)
    if store is not None:
        raise UsageError(f"{folder} is a part of the latent store {store}; `cascade info {store}` describes the store")
    if any(folder.glob("*.safetensors")) or any(folder.glob("*/*.safetensors")):
        return
    images = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if images:
        raise UsageError(f"{folder} is a folder of {images} image(s) and holds no model weights; `cascade "
                         f"encode-dataset {folder} STORE` encodes them into a latent store (which `cascade info "
                         "STORE` then describes), and `cascade info` on a weights folder lists its model files")


@click.command()
@click.argument("weights", required=False, metavar="[DIR|REPO|STORE|LATENTS|REPORT]")
@click.option("--ids", "list_ids", is_flag=True,
              help="With a STORE: list every sample id (the names decode-dataset --ids takes), one per line.")
@user_errors
def info(weights, list_ids) -> None:
    """Describe what is given: the Stable Cascade files in DIR|REPO (variants, dtypes, sizes, notes), a latent
    STORE from `cascade encode-dataset` (count, buckets, dtype, preprocessing, errors; --ids lists its samples), a
    LATENTS file from `cascade encode`, or a REPORT folder from `cascade bench recon`.

    Reads only file headers and metadata (fast, no model is built).
    """
    if weights:
        from datasets_tools.dataset import sample_ids
        from datasets_tools.store import is_latent_store, store_info

        if is_latent_store(weights):
            click.echo("\n".join(sample_ids(weights)) if list_ids else store_info(weights))
            return
        if list_ids:
            raise UsageError(f"--ids lists the samples of a latent store; {weights} is not one")
        given = Path(weights).expanduser()
        if given.is_file() and given.suffix in (".safetensors", ".npy"):
            from .. import weights as W

            if given.suffix == ".npy" or W.read_header(given).metadata.get("format", "").startswith(
                    "cascade-codec latents"):
                click.echo(describe_latents(given))
                return
        if given.is_dir() and (given / "summary.json").is_file():
            from benchmarks.recon.report import TABLE_NAME, load_summary

            summary = load_summary(given)
            click.echo(f"benchmark report: {given} ({summary['dataset'].get('n', '?')} images, codecs "
                       f"{', '.join(c['label'] for c in summary['codecs'])})")
            if (given / TABLE_NAME).is_file():
                click.echo((given / TABLE_NAME).read_text(encoding="utf-8"), nl=False)
            return
        if given.is_dir():
            _refuse_folder_without_weights(given, is_latent_store)

    import torch

    from .. import weights as W
    from ..devices import auto_dtype, resolve_device
    from ..layouts import inventory, official
    from ..layouts import locate as layouts

    source = W.WeightSource(W.default_source(weights))
    click.echo(f"weights: {source.source}" + (f" (built-in, {source.folder})" if source.builtin else ""))
    rows = inventory.inventory(source)
    notes: dict[str, list[str]] = {}
    for row in rows:
        detail = f"  ({row.detail})" if row.detail else ""
        click.echo(f"  {row.label:34s} {row.layout:9s} {row.tensors:5d} tensors {row.params:>14,d} values  "
                   f"{row.dtypes}{detail}")
        if row.note:
            notes.setdefault(row.note, []).append(row.label)
    for note, files in notes.items():
        which = "all files above" if len(files) == len(rows) else ", ".join(files)
        click.secho(f"  note ({which}): {note}", fg="yellow")
    for name in (n for names in W.STAGE_B_FILES.values() for n in names.values()):
        sampling = source.header(name).metadata.get(W.META_SAMPLING) if source.has(name) else None
        if sampling:
            click.echo(f"  sampler defaults ({name}): {sampling}")
    if not rows:
        wanted = [W.STAGE_A_FILE, W.EFFNET_FILE, W.STAGE_B_FILES["lite"]["bf16"]]
        if source.folder is not None:
            raise W.WeightsError(W.missing_files_message(source.source, wanted) + "\n"
                                 + layouts.other_layouts_hint(["stage_a", "stage_b_lite"]))
        raise W.WeightsError(f"none of the files of {source.repo_id} are in the local Hugging Face cache "
                             f"(`cascade info` does not download). Get them with: hf download {source.repo_id} "
                             f"{' '.join(wanted)} --local-dir DIR, then run `cascade info DIR`.")
    used = [f"Stage {component[6].upper()}{component[7:].replace('_', ' ')} ← {loc.label}"
            for component in official.COMPONENTS
            if (loc := layouts.locate(source, component, torch.float32)) is not None]
    encoder = layouts.locate(source, "effnet", torch.float32)
    if encoder is not None:
        used.append(f"encoder ← {encoder.label}")
    click.echo(f"  loaded for an fp32 run: {'; '.join(used)}")
    device = resolve_device(None)
    click.echo(f"  precision with --dtype auto on {device}: {auto_dtype(device)[1]} (Stage B and Stage C; the "
               f"encoder and Stage A run fp32)")
    missing = [name for name, there in ((W.STAGE_A_FILE, layouts.locate(source, "stage_a", torch.float32)),
                                        (W.EFFNET_FILE, encoder)) if not there]
    if missing:
        click.echo(f"  missing for the codec: {', '.join(missing)}"
                   + (" (diffusers ships no EfficientNet encoder, nor does ComfyUI's Stage B file: without it "
                      "the codec decodes but cannot encode)" if W.EFFNET_FILE in missing else ""))


@click.command("convert")
@click.argument("src", metavar="SRC")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "layout", type=click.Choice(["official", "diffusers", "comfyui"]), required=True,
              help="Target layout: official (flat stage_a/stage_b*/stage_c*.safetensors, what the official code "
                   "reads), diffusers (vqgan/, decoder[_lite]/, prior[_lite]/ folders with config.json, what "
                   "StableCascadeUNet/PaellaVQModel.from_pretrained read) or comfyui (all-in-one "
                   "stable_cascade_stage_c[_lite].safetensors and stable_cascade_stage_b[_lite].safetensors, what "
                   "ComfyUI's checkpoint loader reads).")
@click.option("--dtype", type=click.Choice(["keep", "bf16", "fp32"]), default="keep", show_default=True,
              help="Precision of Stage B/C: keep converts every stored variant as it is (lossless; comfyui: one "
                   "file per model, from the fp32 variant if there is one); bf16/fp32 writes one variant per model, "
                   "cast if needed. Everything else is written as stored.")
@click.option("--overwrite", is_flag=True,
              help="Rewrite outputs that already exist (default: skip them, so an interrupted run continues).")
@user_errors(interrupted=RESUMES)
def convert_command(src, dst, layout, dtype, overwrite) -> None:
    """Convert the Stable Cascade weights in SRC (folder, repo id or ComfyUI file; any layout) into DST in another
    layout.

    Tensors are streamed one 16 MiB chunk at a time (the 3.6B prior needs no more memory
    than that); converting back gives bit-identical tensors. EfficientNet, Previewer and
    the Hugging Face folders (text_encoder/, tokenizer/, …) are copied along, or packed
    into and taken out of ComfyUI's all-in-one files.
    """
    from ..files import check_output
    from ..layouts.convert import convert

    check_output(dst, folder=True)
    summary = convert(src, dst, layout, dtype=dtype, overwrite=overwrite, log=click.echo)
    click.echo(summary.line())


@click.command("demo-weights")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@user_errors
def demo_weights(folder, seed) -> None:
    """Write TINY RANDOM weights in the official file layout into FOLDER (for demos and tests).

    They run every code path on a machine without the official weights, but they are
    untrained: decoded images are noise. Every file is labelled as such.
    """
    from ..files import check_output
    from ..tiny import write_tiny_weights

    write_tiny_weights(check_output(folder, folder=True), seed=seed)
    click.echo(f"wrote tiny random (untrained) weights to {folder}")
