"""``cascade encode``, ``decode`` and ``reconstruct``: images ↔ latents files with the codec."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .common import decode_kwargs, decode_options, load_codec, step_progress, user_errors, weights_option


# The range Codec.encode accepts, said once for --help and the error alike.
SCALE = click.FloatRange(0, 1.5, min_open=True)


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output file: .safetensors (latents + metadata: source files, original sizes) or .npy "
                   "(one array; all images must give the same latent size).")
@click.option("--scale", type=SCALE, default=0.75, show_default=True,
              help="Encoder input size as a fraction of the image size, in (0, 1.5], snapped down to a multiple of 32 "
                   "(0.75, the official contract: a 1024² image → 768² → 16×24×24).")
@click.option("--resize", type=click.Choice(["nearest", "bilinear"]), default="nearest", show_default=True,
              help="Downscaling before the encoder: nearest (official reconstruction) or antialiased bilinear.")
@click.option("--latent-dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Storage precision of the written latents.")
@weights_option
@user_errors
def encode(images, out, scale, resize, latent_dtype, weights, stage_b, device, dtype, compile_models) -> None:
    """Encode IMAGES into EfficientNet latents (16 × H·scale/32 × W·scale/32)."""
    import torch

    from ..files import check_input, check_output
    from ..images import load_image, pil_to_tensor
    from ..latents import check_latents_path, save_latents
    from ..progress import progress_bar

    check_output(check_latents_path(out))
    for path in images:
        check_input(path, f"`cascade encode-dataset {path} STORE` encodes a folder of images")
    codec = load_codec(weights, stage_b, device, dtype, decoder=False, compile_models=compile_models)
    latents, sizes = [], []
    for path in progress_bar(None, "encode", unit="img", iterable=images):
        t = pil_to_tensor(load_image(path))
        sizes.append([int(t.shape[-2]), int(t.shape[-1])])
        latents.append(codec.encode(t[None], scale=scale, resize=resize))
    store = torch.float16 if latent_dtype == "fp16" else torch.float32
    save_latents(out, [z.to(store) for z in latents], [str(p) for p in images], sizes, scale, codec.source.source)
    if out.suffix == ".npy":
        click.secho("note: a .npy file holds the latents only: the original sizes and the model are not kept "
                    "(decode uses latent·32/0.75; write .safetensors to keep them)", fg="yellow", err=True)
    shapes = sorted({tuple(z.shape[1:]) for z in latents})
    click.echo(f"wrote {len(latents)} latent(s) of shape {', '.join('×'.join(map(str, s)) for s in shapes)} "
               f"to {out}")


def output_size(height: int | None, width: int | None, recorded: list[int] | None, latent) -> tuple[int, int]:
    """The size to decode one latent at: as given; one side given, the other from the original's aspect (or the
    latent's); neither, the original size recorded by `cascade encode`, else latent·32/0.75."""
    from ..codec import default_output_size

    full = recorded or list(default_output_size(*latent.shape[-2:]))
    if height is None and width is None:
        return full[0], full[1]
    if width is None:
        return height, max(8, round(height * full[1] / full[0]))
    if height is None:
        return max(8, round(width * full[0] / full[1])), width
    return height, width


@click.command()
@click.argument("latents", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output image (.png, .jpg, .webp …). Several latents give OUT_000.png, OUT_001.png, …")
@click.option("--height", type=click.IntRange(8), default=None,
              help="Output height. Default: the original size recorded by `cascade encode`, else latent·32/0.75; "
                   "with only --height or only --width the other side keeps the aspect ratio.")
@click.option("--width", type=click.IntRange(8), default=None, help="Output width (see --height).")
@decode_options
@weights_option
@user_errors
def decode(latents, out, height, width, steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size,
           weights, stage_b, device, dtype, compile_models) -> None:
    """Decode LATENTS (.safetensors from `cascade encode`, or .npy) into images."""
    from ..files import check_output
    from ..images import check_image_path, save_images
    from ..latents import load_latents

    check_output(check_image_path(out))
    found = load_latents(latents)
    codec = load_codec(weights, stage_b, device, dtype, recorded=found.model, compile_models=compile_models)
    kwargs = decode_kwargs(codec, steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size)
    flat = [z for g in found.latents for z in codec.check_latents(g).split(1)]
    images = []
    bar, update = step_progress(kwargs["steps"] * len(flat), "decode")
    t0 = time.perf_counter()
    for i, z in enumerate(flat):
        h, w = output_size(height, width, found.sizes[i] if found.sizes and i < len(found.sizes) else None, z)
        images += codec.decode(z, height=h, width=w, progress=update, **kwargs)
    bar.close()
    paths = save_images(images, out)
    click.echo(f"wrote {len(paths)} image(s): {paths[0]}{' …' if len(paths) > 1 else ''} "
               f"({time.perf_counter() - t0:.1f} s)")


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output image.")
@click.option("--scale", type=SCALE, default=0.75, show_default=True,
              help="Encoder input size as a fraction of the image size, in (0, 1.5] (see `cascade encode --help`).")
@click.option("--resize", type=click.Choice(["nearest", "bilinear"]), default="nearest", show_default=True,
              help="Downscaling before the encoder.")
@decode_options
@weights_option
@user_errors
def reconstruct(image, out, scale, resize, steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size,
                weights, stage_b, device, dtype, compile_models) -> None:
    """Encode IMAGE and decode it back at its own size."""
    from ..files import check_input, check_output
    from ..images import check_image_path, load_image, pil_to_tensor, save_images

    check_output(check_image_path(out))
    t = pil_to_tensor(load_image(check_input(image, "`cascade encode-dataset` and `decode-dataset` take folders")))
    codec = load_codec(weights, stage_b, device, dtype, compile_models=compile_models)
    kwargs = decode_kwargs(codec, steps, cfg, no_cfg, cfg_rho, sampler, seed, caption, batch_size)
    bar, update = step_progress(kwargs["steps"], "decode")
    z = codec.encode(t[None], scale=scale, resize=resize)
    img = codec.decode(z, height=t.shape[-2], width=t.shape[-1], progress=update, **kwargs)
    bar.close()
    save_images(img, out)
    click.echo(f"{image} ({t.shape[-1]}×{t.shape[-2]}) → latent {'×'.join(map(str, z.shape[1:]))} → {out}")
