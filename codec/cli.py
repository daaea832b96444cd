"""The ``cascade`` command line. Each subcommand imports its heavy modules lazily so ``--help`` is instant."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from .errors import CascadeError, MissingInputError, UsageError

# PyTorch reads THP_MEM_ALLOC_ENABLE at its first CPU allocation of >= 2 MB: tensors that large are then
# 2 MB-aligned and madvise(MADV_HUGEPAGE)d, so the kernel backs them with huge pages when its
# transparent_hugepage mode is "madvise" (the usual default). Measured on the 2-core benchmark VM with
# `python -m benchmarks.speed --thp-alloc`: a 1024² Stage A decode 16.3 s instead of 26.6 s (0.09 M page faults
# instead of 5.9 M), an 8×768² EfficientNet batch 6.5 s instead of 9.3 s; outputs bitwise equal, peak RSS
# unchanged. Linux only; a value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

DEFAULT_WEIGHTS = "stabilityai/stable-cascade"
MINI_HELP = ("`mini`: the small codec shipped in the package (trained from scratch by this project on Debian's "
             "freely licensed photos, 256² native; works offline; far below Stable Cascade's quality; a folder "
             "named mini is ./mini).")
WEIGHTS_HELP = ("Folder with the official Stable Cascade files (stage_a.safetensors, effnet_encoder.safetensors, "
                "stage_b_lite[_bf16].safetensors, …; or the diffusers or ComfyUI layout), a Hugging Face repo id, "
                "a ComfyUI single-file checkpoint (stable_cascade_stage_b.safetensors), or " + MINI_HELP
                + f" Default: $CASCADE_WEIGHTS, else {DEFAULT_WEIGHTS}.")


def _run(fn: Callable[[], Any]) -> Any:
    """Turn user-facing errors into a one-paragraph message and exit code 1 (tracebacks are for bugs)."""
    try:
        return fn()
    except CascadeError as e:
        raise click.ClickException(str(e)) from None


def weights_option(f: Callable) -> Callable:
    """Shared --weights/--stage-b/--device/--dtype options."""
    f = click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
                     show_default=True,
                     help="Stage B precision. auto = bf16 on CUDA, fp32 on CPU (bf16 math is slow on most CPUs). "
                          "fp16 is allowed for Stage B only; the encoder and Stage A always run in fp32.")(f)
    f = click.option("--device", default="auto", show_default=True,
                     help="Torch device: auto (CUDA if available), cpu, cuda, cuda:1, mps, …")(f)
    f = click.option("--stage-b", type=click.Choice(["lite", "large", "mini"]), default=None,
                     help="Stage B size: lite (700M parameters) or large (1.5B); mini only in the built-in mini "
                          "codec. Default: lite, or the size in the ComfyUI file given as --weights, or mini for "
                          "--weights mini.")(f)
    f = click.option("--weights", "--model", "-w", default=None, metavar="DIR|REPO|FILE|mini",
                     help=WEIGHTS_HELP)(f)
    return f


def _load_codec(weights: str | None, stage_b: str | None, device: str, dtype: str):
    from .codec import Codec

    source = weights or os.environ.get("CASCADE_WEIGHTS") or DEFAULT_WEIGHTS
    return Codec.from_pretrained(source, stage_b=stage_b, dtype=None if dtype == "auto" else dtype,
                                 device=None if device == "auto" else device)


def _warn_if_tiny(codec) -> None:
    notes = {c.note for c in codec.components.values() if c.note}
    for note in notes:
        click.secho(f"note: {note}", fg="yellow", err=True)


def decode_options(f: Callable) -> Callable:
    """Stage B sampling options shared by decode and reconstruct."""
    opts = [
        click.option("--steps", type=click.IntRange(1, 1000), default=10, show_default=True,
                     help="Stage B sampling steps (official: 10)."),
        click.option("--cfg", type=float, default=1.1, show_default=True,
                     help="Stage B classifier-free guidance scale (official: 1.1); 0 or 1 still runs guidance, "
                          "use --no-cfg to skip the unconditional pass."),
        click.option("--no-cfg", is_flag=True, help="Disable guidance (one model call per step, ~2× faster)."),
        click.option("--cfg-rho", type=float, default=0.7, show_default=True,
                     help="Guidance rescale factor (official: 0.7)."),
        click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True,
                     help="ddpm (official, stochastic) or ddim (deterministic)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the CPU generator for the sampling noise (same seed → same image on any device)."),
        click.option("--caption", default=None,
                     help="Caption for Stage B's text condition (needs the text encoder); default: empty caption."),
        click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True,
                     help="Latents decoded at once."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _decode_kwargs(steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size) -> dict[str, Any]:
    return dict(steps=steps, cfg=None if no_cfg else cfg, cfg_rho=cfg_rho, sampler=sampler, seed=seed,
                caption=caption, batch_size=batch_size)


def _output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(n)]


def _save_images(images, out: Path, texts: dict[str, str] | None = None) -> list[Path]:
    """Write images atomically; ``texts`` go into PNG text chunks (prompt, settings)."""
    paths = _output_paths(out, len(images))
    out.parent.mkdir(parents=True, exist_ok=True)
    for img, p in zip(images, paths):
        tmp = p.with_name(p.stem + ".partial" + p.suffix)
        extra = {}
        if texts and p.suffix.lower() == ".png":
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            for key, value in texts.items():
                info.add_itxt(key, value)
            extra["pnginfo"] = info
        img.save(tmp, **extra)
        os.replace(tmp, p)
    return paths


def _progress_bar(total_steps: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True, disable=None)

    def update(i: int, total: int) -> None:
        bar.update(1)

    return bar, update


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cascade-codec")
def main() -> None:
    """cascade: Stable Cascade's 42× image codec (EfficientNet encoder + Stage B + Stage A).

    A 1024×1024 image becomes a 16×24×24 latent and comes back. Weights: the official
    Stable Cascade files in a folder (--weights DIR) or the Hugging Face repo id.
    """


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output file: .safetensors (latents + metadata: source files, original sizes) or .npy "
                   "(one array; all images must give the same latent size).")
@click.option("--scale", type=float, default=0.75, show_default=True,
              help="Encoder input size as a fraction of the image size, snapped down to a multiple of 32 "
                   "(0.75: a 1024² image → 768² → 16×24×24).")
@click.option("--resize", type=click.Choice(["nearest", "bilinear"]), default="nearest", show_default=True,
              help="Downscaling before the encoder: nearest (official reconstruction) or antialiased bilinear.")
@click.option("--latent-dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Storage precision of the written latents.")
@weights_option
def encode(images, out, scale, resize, latent_dtype, weights, stage_b, device, dtype) -> None:
    """Encode IMAGES into EfficientNet latents (16 × H·scale/32 × W·scale/32)."""
    def go():
        import torch
        from tqdm.auto import tqdm

        from .images import load_image, pil_to_tensor

        if out.suffix not in (".safetensors", ".npy"):
            raise UsageError(f"{out}: the output must end in .safetensors or .npy")
        codec = _load_codec(weights, stage_b, device, dtype)
        _warn_if_tiny(codec)
        latents, sizes = [], []
        for path in tqdm(images, desc="encode", unit="img", disable=None):
            t = pil_to_tensor(load_image(path))
            sizes.append([int(t.shape[-2]), int(t.shape[-1])])
            latents.append(codec.encode(t[None], scale=scale, resize=resize))
        store = torch.float16 if latent_dtype == "fp16" else torch.float32
        _write_latents(out, [z.to(store) for z in latents], [str(p) for p in images], sizes, scale)
        shapes = sorted({tuple(z.shape[1:]) for z in latents})
        click.echo(f"wrote {len(latents)} latent(s) of shape {', '.join('×'.join(map(str, s)) for s in shapes)} "
                   f"to {out}")
    _run(go)


def _write_latents(out: Path, latents: list, sources: list[str], sizes: list[list[int]], scale: float) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from . import __version__

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    same = len({tuple(z.shape) for z in latents}) == 1
    if out.suffix == ".npy":
        if not same:
            raise UsageError("images of different sizes give latents of different shapes, which a .npy file "
                             "cannot hold; write .safetensors instead")
        with open(tmp, "wb") as f:
            np.save(f, torch.cat(latents).numpy())
    else:
        tensors = {"latents": torch.cat(latents).contiguous()} if same else \
            {f"latents.{i}": z.contiguous() for i, z in enumerate(latents)}
        meta = {"sources": json.dumps(sources), "sizes": json.dumps(sizes), "encoder_scale": str(scale),
                "format": "cascade-codec latents v1", "tool": f"cascade-codec {__version__}"}
        save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)


def _read_latents(path: Path):
    """Latents and original sizes (if recorded) from a .safetensors or .npy file."""
    import numpy as np
    import torch

    if not path.is_file():
        raise MissingInputError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"{path}: not a readable .npy array ({e})") from None
        return [torch.from_numpy(arr)], None
    from .weights import iter_tensors, read_header

    header = read_header(path)
    tensors = dict(iter_tensors(header, torch.float32))
    keys = sorted(tensors, key=lambda k: (len(k), k))
    sizes = json.loads(header.metadata["sizes"]) if "sizes" in header.metadata else None
    if not keys:
        raise UsageError(f"{path} holds no tensors")
    return [tensors[k] for k in keys], sizes


@main.command()
@click.argument("latents", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output image (.png, .jpg, .webp …). Several latents give OUT_000.png, OUT_001.png, …")
@click.option("--height", type=click.IntRange(8), default=None,
              help="Output height. Default: the original size recorded by `cascade encode`, else latent·32/0.75.")
@click.option("--width", type=click.IntRange(8), default=None, help="Output width (see --height).")
@decode_options
@weights_option
def decode(latents, out, height, width, steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size,
           weights, stage_b, device, dtype) -> None:
    """Decode LATENTS (.safetensors from `cascade encode`, or .npy) into images."""
    def go():
        groups, sizes = _read_latents(latents)
        codec = _load_codec(weights, stage_b, device, dtype)
        _warn_if_tiny(codec)
        kwargs = _decode_kwargs(steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size)
        flat = [z for g in groups for z in codec.check_latents(g).split(1)]
        images = []
        bar, update = _progress_bar(steps * len(flat), "decode")
        t0 = time.perf_counter()
        for i, z in enumerate(flat):
            h, w = height, width
            if sizes is not None and i < len(sizes):
                h, w = h or sizes[i][0], w or sizes[i][1]
            images += codec.decode(z, height=h, width=w, progress=update, **kwargs)
        bar.close()
        paths = _save_images(images, out)
        click.echo(f"wrote {len(paths)} image(s): {paths[0]}{' …' if len(paths) > 1 else ''} "
                   f"({time.perf_counter() - t0:.1f} s)")
    _run(go)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output image.")
@click.option("--scale", type=float, default=0.75, show_default=True,
              help="Encoder input size as a fraction of the image size (see `cascade encode --help`).")
@click.option("--resize", type=click.Choice(["nearest", "bilinear"]), default="nearest", show_default=True,
              help="Downscaling before the encoder.")
@decode_options
@weights_option
def reconstruct(image, out, scale, resize, steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size,
                weights, stage_b, device, dtype) -> None:
    """Encode IMAGE and decode it back at its own size."""
    def go():
        from .images import load_image, pil_to_tensor

        t = pil_to_tensor(load_image(image))
        codec = _load_codec(weights, stage_b, device, dtype)
        _warn_if_tiny(codec)
        kwargs = _decode_kwargs(steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size)
        bar, update = _progress_bar(steps, "decode")
        z = codec.encode(t[None], scale=scale, resize=resize)
        img = codec.decode(z, height=t.shape[-2], width=t.shape[-1], progress=update, **kwargs)
        bar.close()
        _save_images(img, out)
        click.echo(f"{image} ({t.shape[-1]}×{t.shape[-2]}) → latent {'×'.join(map(str, z.shape[1:]))} → {out}")
    _run(go)


@main.command()
@click.argument("weights", required=False, metavar="[DIR|REPO|STORE]")
def info(weights) -> None:
    """Show which Stable Cascade files are in DIR|REPO (variants, dtypes, sizes, notes), or summarise a latent
    STORE written by `cascade encode-dataset` (count, buckets, dtype, preprocessing, errors).

    Reads only file headers and metadata (fast, no model is built).
    """
    if weights and is_latent_store(weights):
        click.echo(store_info(weights))
        return

    def go():
        import torch

        from . import interop
        from . import weights as W

        source = W.WeightSource(weights or os.environ.get("CASCADE_WEIGHTS") or DEFAULT_WEIGHTS)
        click.echo(f"weights: {source.source}" + (f" (built-in, {source.folder})" if source.builtin else ""))
        rows = interop.inventory(source)
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
                                     + interop.other_layouts_hint(["stage_a", "stage_b_lite"]))
            raise W.WeightsError(f"none of the files of {source.repo_id} are in the local Hugging Face cache "
                                 f"(`cascade info` does not download). Get them with: hf download {source.repo_id} "
                                 f"{' '.join(wanted)} --local-dir DIR, then run `cascade info DIR`.")
        used = [f"Stage {component[6].upper()}{component[7:].replace('_', ' ')} ← {loc.label}"
                for component in interop.COMPONENTS
                if (loc := interop.locate(source, component, torch.float32)) is not None]
        encoder = interop.locate(source, "effnet", torch.float32)
        if encoder is not None:
            used.append(f"encoder ← {encoder.label}")
        click.echo(f"  loaded for an fp32 run: {'; '.join(used)}")
        missing = [name for name, there in ((W.STAGE_A_FILE, interop.locate(source, "stage_a", torch.float32)),
                                            (W.EFFNET_FILE, encoder)) if not there]
        if missing:
            click.echo(f"  missing for the codec: {', '.join(missing)}"
                       + (" (diffusers ships no EfficientNet encoder, nor does ComfyUI's Stage B file: without it "
                          "the codec decodes but cannot encode)" if W.EFFNET_FILE in missing else ""))
    _run(go)


@main.command("convert")
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
def convert_command(src, dst, layout, dtype, overwrite) -> None:
    """Convert the Stable Cascade weights in SRC (folder, repo id or ComfyUI file; any layout) into DST in another
    layout.

    Tensors are streamed one 16 MiB chunk at a time (the 3.6B prior needs no more memory
    than that); converting back gives bit-identical tensors. EfficientNet, Previewer and
    the Hugging Face folders (text_encoder/, tokenizer/, …) are copied along, or packed
    into and taken out of ComfyUI's all-in-one files.
    """
    def go():
        from .convert import convert

        summary = convert(src, dst, layout, dtype=dtype, overwrite=overwrite, log=click.echo)
        click.echo(summary.line())
    _run(go)


@main.command("demo-weights")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def demo_weights(folder, seed) -> None:
    """Write TINY RANDOM weights in the official file layout into FOLDER (for demos and tests).

    They run every code path on a machine without the official weights, but they are
    untrained: decoded images are noise. Every file is labelled as such.
    """
    def go():
        from .tiny import write_tiny_weights

        write_tiny_weights(folder, seed=seed)
        click.echo(f"wrote tiny random (untrained) weights to {folder}")
    _run(go)


@main.command("decode-dataset")
@click.argument("store", metavar="STORE")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--ids", default=None, help="Comma-separated sample ids to decode (default: all, see --limit).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Decode at most N samples (in store order).")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg", "webp"]), default="png", show_default=True,
              help="Image file format.")
@click.option("--use-captions", is_flag=True,
              help="Condition Stage B on each sample's stored caption (needs the text encoder); default: the "
                   "empty caption, as for reconstruction.")
@decode_options
@weights_option
def decode_dataset(store, out_dir, ids, limit, fmt, use_captions, steps, cfg, no_cfg, cfg_rho, sampler, seed, caption,
                   batch_size, weights, stage_b, device, dtype) -> None:
    """Decode samples of a latent STORE (from `cascade encode-dataset`) back to images in OUT_DIR/<id>.<format>.

    Each latent is decoded at the size it stands for (encoder input size / 0.75, e.g. 768 → 1024).
    Existing output files are skipped, so an interrupted run continues where it stopped.
    """
    def go():
        from datasets_tools.dataset import LatentDataset

        ds = LatentDataset(store)
        wanted = list(range(len(ds)))
        if ids:
            index = {sid: i for i, sid in enumerate(ds.ids)}
            missing = [sid for sid in ids.split(",") if sid not in index]
            if missing:
                raise UsageError(f"{store} has no sample(s) with id {', '.join(missing[:10])}")
            wanted = [index[sid] for sid in ids.split(",")]
        wanted = wanted[:limit] if limit else wanted
        codec = _load_codec(weights, stage_b, device, dtype)
        _warn_if_tiny(codec)
        kwargs = _decode_kwargs(steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size)
        bar, update = _progress_bar(steps * len(wanted), "decode-dataset")
        written = skipped = 0
        for i in wanted:
            item = ds[i]
            target = out_dir / f"{item['id'].replace('/', '__')}.{fmt}"
            if target.exists():
                skipped += 1
                bar.update(steps)
                continue
            if use_captions:
                kwargs["caption"] = item.get("caption") or None
            _save_images(codec.decode(item["latent"], progress=update, **kwargs), target)
            written += 1
        bar.close()
        click.echo(f"decoded {written} sample(s) into {out_dir} ({skipped} already there)")
    _run(go)


def store_info(path: str) -> str:
    """Summary of a latent store (count, buckets and shapes, dtype, preprocessing, errors) for ``cascade info``."""
    from datasets_tools.store import store_info as describe

    return _run(lambda: describe(path))


def is_latent_store(path: str) -> bool:
    """Whether ``path`` (folder or fsspec URL) is a latent store (zarr.json with our format attribute).

    For ``cascade info``: dispatch to :func:`store_info` when true, else show weights.
    """
    from datasets_tools.store import FORMAT, Location

    try:
        meta = Location(path).read_json("zarr.json")
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a store
        return False
    return isinstance(meta, dict) and meta.get("attributes", {}).get("format") == FORMAT


@main.command("encode-dataset")
@click.argument("source", metavar="SOURCE")
@click.argument("out", metavar="OUT")
@click.option("--weights", "--model", "-w", default=None, metavar="DIR|REPO|mini",
              help="Folder with effnet_encoder.safetensors (official layout), a Hugging Face repo id, or "
                   + MINI_HELP + f" Default: $CASCADE_WEIGHTS, else {DEFAULT_WEIGHTS}.")
@click.option("--size", type=click.IntRange(32), default=None,
              help="Encoder input size in pixels (multiple of 32): the square crop side, the bucket density "
                   "(size²) with --buckets, or the short side with --keep-aspect. Default: 768 (→ 24×24 latents, "
                   "decoded at 1024²), or the built-in model's native size (mini: 192 → 6×6, decoded at 256²).")
@click.option("--buckets", "policy", flag_value="buckets",
              help="Multi-aspect buckets (the official list at size² pixels, factor 32); each image goes to the "
                   "bucket with the nearest aspect ratio, resized to cover it and centre-cropped.")
@click.option("--keep-aspect", "policy", flag_value="keep-aspect",
              help="Short side to --size, then each side centre-cropped down to a multiple of 32.")
@click.option("--center", "policy", flag_value="center", default=True,
              help="Short side to --size, then a centre square crop (the default; Stage C's training contract).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Images encoded at once (per bucket).")
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True,
              help="Background processes decoding and resizing images while the encoder runs (0: in-process).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage precision of the latents (computation is always fp32).")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Use only the first N samples of SOURCE (in its deterministic order).")
@click.option("--dry-run", is_flag=True,
              help="List SOURCE and check OUT, print what would be encoded, write nothing.")
@click.option("--shard-size", type=click.IntRange(1), default=256, show_default=True,
              help="Samples per work unit and rows per Zarr shard; fixed when the store is created.")
@click.option("--text-encoder", default=None, metavar="DIR|REPO",
              help="Also store CLIP text embeddings of the captions (pooled 1×C and sequence 77×C, for Stage C "
                   "training), computed with the CLIP-G text encoder in DIR/text_encoder and DIR/tokenizer (or a "
                   "Hugging Face repo id). Samples without a caption get the embedding of the empty string.")
@click.option("--stage-a", "stage_a", is_flag=True,
              help="Also store Stage A latents (4×H/4×W/4, encoder output / 0.43) of the same preprocessed image, "
                   "for Stage B fine-tuning; needs stage_a.safetensors in --weights.")
@click.option("--no-progress", is_flag=True, help="No progress bar (the summary line is still printed).")
def encode_dataset_command(source, out, weights, size, policy, batch_size, workers, dtype, limit, dry_run, shard_size,
                           text_encoder, stage_a, no_progress) -> None:
    """Encode every image of SOURCE into the Zarr latent store OUT (resumable, idempotent).

    SOURCE: a folder of images (recursive; captions from sidecar .txt/.json files), a
    manifest (.csv with a header or .jsonl: path|url, caption, optional id), or
    webdataset-style .tar shards (brace patterns like shards-{000..009}.tar and fsspec
    URLs allowed). OUT: a local folder or an fsspec URL (s3://bucket/store.zarr).

    Kill it at any moment and run the same command again: it continues. Run it again
    after SOURCE grew: only new samples are encoded. Under `torchrun --nproc_per_node N`
    the work is split across processes. Unreadable images are skipped and recorded in
    the store's errors table. --text-encoder and --stage-a add optional arrays; a store
    keeps the extras it was made with (resume it with the same options).
    """
    from datasets_tools.encode import encode_dataset

    from . import weights as W

    try:
        source_w = W.WeightSource(weights or os.environ.get("CASCADE_WEIGHTS") or DEFAULT_WEIGHTS)
        if size is None:
            from .codec import encoder_input_size

            native = W.BUILTIN_MODELS[source_w.builtin].native_size if source_w.builtin else 1024
            size = encoder_input_size(native, native)[0]
        if source_w.has(W.EFFNET_FILE):
            note = W.read_header(source_w.path(W.EFFNET_FILE)).metadata.get(W.META_NOTE)
            if note:
                click.secho(f"note: {note}", fg="yellow", err=True)
        summary = encode_dataset(source, out, weights or os.environ.get("CASCADE_WEIGHTS") or DEFAULT_WEIGHTS,
                                 policy=policy, size=size, batch_size=batch_size, workers=workers, dtype=dtype,
                                 limit=limit, dry_run=dry_run, shard_size=shard_size, progress=not no_progress,
                                 log=click.echo, text_encoder=text_encoder, stage_a=stage_a)
    except CascadeError as e:
        raise click.ClickException(str(e)) from None
    if int(os.environ.get("RANK", "0")) == 0 or dry_run:
        click.echo(summary.line())


@main.group()
def bench() -> None:
    """Benchmarks: reconstruction quality of Stable Cascade against other codecs, and report comparison."""


CODEC_HELP = ("Codec to run, FAMILY[:key=value,…]; repeat for several. A key with several values "
              "(scale=0.5,0.75,1.0) is a sweep. Families: sc (Stable Cascade: stage_b=auto|lite|large|mini, "
              "steps=10, cfg=1.1|none, cfg_rho=0.7, sampler=ddpm|ddim, scale=0.75 encoder input fraction, "
              "resize=nearest|bilinear); jpeg (quality=10,25,50,75,90); jpeg-budget (largest JPEG quality within "
              "the float16 latent's bytes at scale=0.75, or bytes=N); bicubic (down/up to the latent's number of "
              "values at scale=0.75, or values=N); vae (diffusers AutoencoderKL/AutoencoderDC: path=DIR, name=). "
              "Default: sc, jpeg-budget, bicubic.")


@bench.command("recon")
@click.argument("dataset", metavar="DATASET")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Report folder: per_image.csv, summary.json, table.md, grid.png, rate_quality.png. Running "
                   "the same command again resumes an interrupted run.")
@click.option("--codec", "codecs", multiple=True, metavar="SPEC", help=CODEC_HELP)
@click.option("--size", type=click.IntRange(32), default=None,
              help="Side of the square test images in pixels, a multiple of 32 (default 1024): short side "
                   "resized to it (antialiased bilinear), centre square crop. Not for latent stores.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Use only the first N images of DATASET (in its deterministic order).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of Stage B's sampling noise (per image: derived from the seed and the image id). Same "
                   "seed, same numbers.")
@click.option("--weights", "--model", "-w", default=None, metavar="DIR|REPO|mini", help=WEIGHTS_HELP)
@click.option("--device", default="auto", show_default=True,
              help="Torch device for the models and metrics: auto (CUDA if available), cpu, cuda, cuda:1, …")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Stable Cascade Stage B precision (auto: bf16 on CUDA, fp32 on CPU). VAEs run in fp32.")
@click.option("--lpips-net", type=click.Choice(["alex", "vgg"]), default="alex", show_default=True,
              help="LPIPS trunk: alex (the usual LPIPS) or vgg.")
@click.option("--lpips-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ImageNet weights of the LPIPS trunk (torchvision's alexnet-owt-7be5be79.pth or "
                   "vgg16-397923af.pth). Default: that file in the torch hub cache "
                   "($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints); without it LPIPS is skipped "
                   "and the report says so.")
@click.option("--fid-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inception-v3 weights for rFID (torch-fidelity's weights-inception-2015-12-05-6726825d.pth). "
                   "Default: that file in the torch hub cache; without it rFID is skipped and the report says so.")
@click.option("--no-lpips", is_flag=True, help="Do not compute LPIPS.")
@click.option("--no-fid", is_flag=True, help="Do not compute rFID.")
@click.option("--grid-images", type=click.IntRange(0), default=3, show_default=True,
              help="Images shown in grid.png (N spread evenly over the set), each beside every codec's "
                   "reconstruction with a zoomed centre crop; 0: no grid.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for torch (default: torch's choice); on a busy machine 1 is often faster.")
@click.option("--overwrite", is_flag=True, help="Start afresh in a report folder that holds an earlier run.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def bench_recon(dataset, output, codecs, size, limit, seed, weights, device, dtype, lpips_net, lpips_weights,
                fid_weights, no_lpips, no_fid, grid_images, threads, overwrite, no_progress) -> None:
    """Reconstruction quality and speed of codecs on DATASET, with reports in OUTPUT.

    DATASET: a folder of images, a CSV/JSONL manifest, webdataset .tar shards, or a latent
    store from `cascade encode-dataset` (decode-only: the stored latents are decoded).
    Metrics on uint8-rounded reconstructions: PSNR, SSIM, MS-SSIM, LPIPS, rFID, bits per
    pixel, compression ratio, encode/decode seconds per image, peak memory.
    """
    def go():
        from benchmarks.recon import DEFAULT_CODECS, ReconConfig, run_recon
        from benchmarks.recon.report import TABLE_NAME

        cfg = ReconConfig(dataset=dataset, output=str(output), codecs=list(codecs or DEFAULT_CODECS), size=size,
                          limit=limit, seed=seed, weights=weights, device=device, dtype=dtype, lpips_net=lpips_net,
                          lpips_weights=str(lpips_weights) if lpips_weights else None,
                          fid_weights=str(fid_weights) if fid_weights else None, lpips=not no_lpips,
                          fid=not no_fid, grid_images=grid_images, threads=threads, overwrite=overwrite,
                          progress=not no_progress)
        try:
            summary = run_recon(cfg, log=lambda m: click.secho(m, fg="yellow" if m.startswith("note") else None,
                                                               err=True))
        except KeyboardInterrupt:
            raise click.ClickException(f"interrupted; run the same command again to resume from {output}") from None
        click.echo((output / TABLE_NAME).read_text(encoding="utf-8"), nl=False)
        files = [f for f in summary["files"].values() if f]
        click.echo(f"\nreport: {output}/ ({', '.join(files)})")
    _run(go)


@bench.command("compare")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
def bench_compare(a, b) -> None:
    """Print the differences B − A of two reports (folders from `cascade bench recon` or their summary.json)."""
    def go():
        from benchmarks.recon.report import compare, load_summary

        click.echo(compare(load_summary(a), load_summary(b), str(a), str(b)), nl=False)
    _run(go)


from .generation.commands import generate  # noqa: E402 - the command module imports this one lazily

main.add_command(generate)


# = codec.training.TASKS + codec.generation.training.TASKS (tests/test_finetune.py checks); spelled out here so that
# `cascade --help` does not import the trainer
TRAIN_TASKS = ("stage-c", "lora", "stage-b", "controlnet", "stage-a", "codec")


@main.command("train")
@click.argument("task", type=click.Choice(TRAIN_TASKS))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--device", default="auto", show_default=True,
              help="Torch device: auto (this process's CUDA device under torchrun, else CUDA if available, else CPU).")
def train_command(task, config, device) -> None:
    """Train with the YAML CONFIG: TASK is stage-c (full Stage C), lora (LoRA + new tokens on Stage C),
    stage-b (full Stage B), controlnet (a ControlNet on a frozen Stage C), stage-a (Stage A autoencoder from
    scratch) or codec (encoder + Stage B jointly from scratch on a trained Stage A; how the mini codec was made).

    Reads latents from the Zarr store of data.store (controlnet, stage-a, codec: images from data.images), writes
    OUTPUT_DIR/checkpoint/ (model.safetensors
    in the release format, optimiser and RNG state), log.jsonl and previews/. Run the same command
    again after a stop: it resumes exactly where the last checkpoint left off. Several processes:
    `torchrun --nproc_per_node N -m codec.cli train TASK CONFIG` (DDP; distributed.strategy: fsdp to
    shard large models). Config keys: see codec/training/config.py; annotated examples in
    codec/generation/training/examples/ (stage-c, lora, controlnet), codec/training/examples/ (stage-b) and
    configs/mini/ (stage-a, codec).
    """
    def go():
        from tqdm.auto import tqdm

        from datasets_tools.training_data import training_dataset

        from .generation.training import TASKS as GENERATION_TASKS
        from .training import TASKS, task_class, train

        pos = train(task_class(task, {**TASKS, **GENERATION_TASKS}), config, training_dataset, echo=tqdm.write,
                    device=None if device == "auto" else device)
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"done: {pos.step} updates ({pos.epoch} full epochs)")
    _run(go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
