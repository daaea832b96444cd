"""``cascade encode-dataset`` and ``decode-dataset``: folders, manifests and shards ↔ Zarr latent stores."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .common import (MINI_HELP, RESUMES, compile_option, decode_kwargs, decode_options, load_codec, user_errors,
                     weights_option)


@click.command("encode-dataset")
@click.argument("dataset", metavar="SOURCE")
@click.argument("out", metavar="OUT")
@click.option("--weights", "--model", "-w", default=None, metavar="DIR|REPO|mini",
              help="Folder with effnet_encoder.safetensors (official layout), a Hugging Face repo id, or "
                   + MINI_HELP + " Default: $CASCADE_WEIGHTS, else stabilityai/stable-cascade.")
@click.option("--size", type=click.IntRange(32), default=None,
              help="Encoder input size in pixels (multiple of 32): the square crop side, the bucket density "
                   "(size²) with --buckets, or the short side with --keep-aspect. Default: 768 (→ 24×24 latents, "
                   "decoded at 1024²), or the built-in model's native size (mini: 192 → 6×6, decoded at 256²).")
@click.option("--buckets", is_flag=True,
              help="Multi-aspect buckets (the official list at size² pixels, factor 32); each image goes to the "
                   "bucket with the nearest aspect ratio, resized to cover it and centre-cropped.")
@click.option("--keep-aspect", is_flag=True,
              help="Short side to --size, then each side centre-cropped down to a multiple of 32.")
@click.option("--center", is_flag=True,
              help="Short side to --size, then a centre square crop (the default; Stage C's training contract).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Images encoded at once (per bucket).")
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True,
              help="Background processes decoding and resizing images while the encoder runs (0: in-process).")
@click.option("--latent-dtype", "--dtype", "dtype", type=click.Choice(["float16", "float32", "int8"]),
              default="float16", show_default=True,
              help="Storage precision of the latents (computation is always fp32). int8: half the bytes of float16, "
                   "per-channel scale and offset in the store, read back as float32 by LatentDataset; its extras "
                   "stay float16. --dtype is the old name of this option.")
@click.option("--device", default="auto", show_default=True,
              help="Torch device of the encoder: auto (a GPU when there is one; under torchrun each process its "
                   "own, cuda:LOCAL_RANK), cpu, cuda, cuda:1, …")
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
@compile_option
@user_errors(interrupted=RESUMES)
def encode_dataset_command(dataset, out, weights, size, buckets, keep_aspect, center, batch_size, workers, dtype,
                           device, limit, dry_run, shard_size, text_encoder, stage_a, no_progress,
                           compile_models) -> None:
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

    from .. import weights as W
    from ..codec import encoder_input_size
    from ..devices import resolve_device
    from ..files import check_output

    given = [name for name, on in (("--buckets", buckets), ("--keep-aspect", keep_aspect), ("--center", center)) if on]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} are different crop policies; give one (default: --center)")
    policy = given[0][2:] if given else "center"
    if "://" not in str(out):
        check_output(out, folder=True)
    source = W.default_source(weights)
    source_w = W.WeightSource(source)
    if size is None:
        native = W.BUILTIN_MODELS[source_w.builtin].native_size if source_w.builtin else 1024
        size = encoder_input_size(native, native)[0]
    if source_w.has(W.EFFNET_FILE):
        note = W.read_header(source_w.path(W.EFFNET_FILE)).metadata.get(W.META_NOTE)
        if note:
            click.secho(f"note: {note}", fg="yellow", err=True)
    summary = encode_dataset(dataset, out, source,
                             policy=policy, size=size, batch_size=batch_size, workers=workers, dtype=dtype,
                             limit=limit, dry_run=dry_run, shard_size=shard_size, progress=not no_progress,
                             log=click.echo, text_encoder=text_encoder, stage_a=stage_a,
                             device=str(resolve_device(device)), compile=compile_models)
    if int(os.environ.get("RANK", "0")) == 0 or dry_run:
        click.echo(summary.line())


@click.command("decode-dataset")
@click.argument("store", metavar="STORE")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--ids", default=None, help="Comma-separated sample ids to decode (default: all, see --limit).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Decode at most N samples (in store order).")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg", "webp"]), default="png", show_default=True,
              help="Image file format.")
@click.option("--use-captions", is_flag=True,
              help="Condition Stage B on each sample's stored caption (needs the text encoder); default: the "
                   "empty caption, as for reconstruction.")
@click.option("--no-progress", is_flag=True, help="No progress bar (the summary line is still printed).")
@decode_options
@weights_option
@user_errors(interrupted=RESUMES)
def decode_dataset(store, out_dir, ids, limit, fmt, use_captions, no_progress, steps, cfg, no_cfg, cfg_rho, sampler,
                   seed, caption, batch_size, weights, stage_b, device, dtype, compile_models) -> None:
    """Decode samples of a latent STORE (from `cascade encode-dataset`) back to images in OUT_DIR/<id>.<format>.

    An id's folders become subfolders (photos/a → OUT_DIR/photos/a.png), as in the source folder; `cascade info
    STORE --ids` lists the ids.

    Each latent is decoded at the size it stands for (encoder input size / 0.75, e.g. 768 → 1024).
    Existing output files are skipped, so an interrupted run continues where it stopped.
    """
    from datasets_tools.decode import decode_dataset
    from datasets_tools.encode import store_model

    from ..files import check_output

    if use_captions and caption is not None:
        raise click.UsageError("--use-captions conditions each sample on its stored caption and --caption all of them "
                               "on one caption: give one of the two")

    check_output(out_dir, folder=True)
    codec = load_codec(weights, stage_b, device, dtype, recorded=store_model(store), compile_models=compile_models)
    summary = decode_dataset(store, out_dir, codec, ids=ids.split(",") if ids else None, limit=limit, fmt=fmt,
                             use_captions=use_captions, progress=False if no_progress else None,
                             **decode_kwargs(codec, steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size))
    click.echo(summary.line())


@click.command("upgrade-store")
@click.argument("store", metavar="STORE")
@click.option("--no-progress", is_flag=True, help="No progress bar (the summary line is still printed).")
@user_errors(interrupted=RESUMES)
def upgrade_store_command(store, no_progress) -> None:
    """Convert the latent STORE (a folder or an fsspec URL) in place to the current format version (2).

    Version 1 stores (cascade-codec before format version 2) keep their id, source, caption and
    error-table strings in zarr-python's own "string" data type, which other Zarr v3 readers
    (tensorstore, …) cannot open; version 2 keeps them as UTF-8 bytes plus offsets, in core Zarr v3
    types. Latents, extras and the index are not touched. Version 1 stores stay readable as they
    are; encode-dataset only extends a store after this upgrade.

    Kill it at any moment and run it again: it finishes with the same store, and each old string
    array is deleted only after its new copy has been written and read back equal. Until it has
    finished, readers refuse the store with a message pointing here. Do not run it while
    encode-dataset writes to STORE. A store already at version 2 is left as it is.
    """
    from datasets_tools.upgrade import upgrade_store

    summary = upgrade_store(store, progress=not no_progress)
    click.echo(summary.line())
