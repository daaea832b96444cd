"""``cascade generate``: text-to-image, image variation and image-to-image from the command line.

Heavy imports happen inside the command, so that ``cascade --help`` stays instant.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click

from ..errors import MissingInputError, UsageError
from .common import user_errors

PROMPT_FILE_HELP = ("Text file with one prompt per line (blank lines and lines starting with # are skipped), or "
                    "a .jsonl file of {\"prompt\": ..., \"negative\": ..., \"seed\": ...} objects. Each prompt gets "
                    "its own seed (--seed + line index unless given) and its own output files.")


def _parse_size(value: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` or ``"S"`` → ``(height, width)``; ``None`` → ``(None, None)``."""
    if value is None:
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*", value.lower())
    if match is None:
        raise click.BadParameter(f"{value!r} is not WxH (e.g. 1024x1024, 1216x832) or a single side",
                                 param_hint="--size")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    from ..generation.pipeline import check_size

    try:
        check_size(height, width)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--size") from None
    return height, width


def _parse_lora(value: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:STRENGTH`` → ``(path, strength)``."""
    path, _, strength = value.rpartition(":")
    if path:
        try:
            return Path(path), float(strength)
        except ValueError:
            pass
    return Path(value), 1.0


def read_prompt_file(path: Path) -> list[dict]:
    """Prompts from a text file (one per line) or JSONL (``prompt``, optional ``negative`` and ``seed``)."""
    if not path.is_file():
        raise MissingInputError(f"prompt file {path} does not exist")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be an object with a "
                                 "\"prompt\" field") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise UsageError(f"{path}:{n} has no \"prompt\" string")
            items.append(item)
        else:
            items.append({"prompt": line})
    if not items:
        raise UsageError(f"prompt file {path} holds no prompts")
    return items


def _png_text(prompt: str, negative: str, seed: int | None, settings) -> dict[str, str]:
    from dataclasses import asdict

    return {"prompt": prompt, "negative_prompt": negative,
            "cascade_codec": json.dumps({**asdict(settings), "seed": seed})}


@click.command()
@click.argument("prompt", required=False)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("generated.png"),
              show_default=True,
              help="Output image (.png, .jpg, .webp). Several images give OUT_000.png, OUT_001.png, … PNGs carry the "
                   "prompt and every setting in their text chunks.")
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), default=None, help=PROMPT_FILE_HELP)
@click.option("--negative", default="", help="Negative prompt: Stage C's unconditional text (official: empty).")
@click.option("--size", default=None, metavar="WxH",
              help="Output size, e.g. 1024x1024 (default), 1216x832, 1000x600; 256–4096 px per side. With --image: "
                   "default is the image's aspect at a 1024 px short side.")
@click.option("--n", "num_images", type=click.IntRange(1), default=1, show_default=True,
              help="Images per prompt.")
@click.option("--steps-c", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Stage C sampling steps (official: 20).")
@click.option("--cfg-c", type=float, default=4.0, show_default=True,
              help="Stage C classifier-free guidance scale (official: 4).")
@click.option("--shift-c", type=float, default=2.0, show_default=True, help="Stage C schedule shift (official: 2).")
@click.option("--steps-b", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Stage B sampling steps (official: 10).")
@click.option("--cfg-b", type=float, default=1.1, show_default=True,
              help="Stage B guidance scale (official: 1.1).")
@click.option("--cfg-rho", type=click.FloatRange(0, 1), default=0.7, show_default=True,
              help="Guidance rescale factor in [0, 1] for both stages (0: off; official: 0.7).")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True,
              help="ddpm (official, stochastic) or ddim (deterministic).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the CPU generator (same seed → same image on any device; official RNG order).")
@click.option("--image", type=click.Path(path_type=Path), default=None,
              help="Input image for --mode variation or img2img.")
@click.option("--mode", type=click.Choice(["variation", "img2img"]), default=None,
              help="With --image: variation (condition on the image's CLIP embedding; default) or img2img (start "
                   "from the image's latent, see --strength).")
@click.option("--strength", type=click.FloatRange(0.01, 1.0), default=0.8, show_default=True,
              help="img2img: how much noise is added (1 = ignore the image). Runs int(steps_c·strength) steps; "
                   "the image is noised with shift 1 as in the official notebook.")
@click.option("--controlnet", type=click.Choice(["canny", "inpainting", "super_resolution"]), default=None,
              help="Guide Stage C with an official ControlNet (controlnet/<kind>.safetensors in the weights folder) "
                   "from --control-image.")
@click.option("--control-image", type=click.Path(path_type=Path), default=None,
              help="Image the ControlNet reads: edges are taken from it (canny), it is filled (inpainting) or "
                   "upscaled 2× (super_resolution). Sets the default size like --image.")
@click.option("--control-strength", type=float, default=1.0, show_default=True,
              help="Multiplier of the ControlNet features (official: 1).")
@click.option("--mask", "control_mask", type=click.Path(path_type=Path), default=None,
              help="Inpainting: image whose white part is the region to fill. Without it the salient region is "
                   "found by controlnet/saliency_model.safetensors.")
@click.option("--control-threshold", type=float, default=0.2, show_default=True,
              help="Inpainting without --mask: saliency threshold (official: 0.2).")
@click.option("--outpaint", is_flag=True, help="Inpainting without --mask: fill around the salient object instead.")
@click.option("--preview-dir", type=click.Path(path_type=Path), default=None,
              help="Write a Previewer image of Stage C's current estimate after every step into this folder.")
@click.option("--save-latents", is_flag=True,
              help="Also write the Stage C latents next to each image (.safetensors, decodable with `cascade decode`).")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True,
              help="Images sampled at once.")
@click.option("--stage-c", type=click.Choice(["lite", "large"]), default=None,
              help="Stage C size: lite (1.0B) or large (3.6B). Default: lite, or the size in the ComfyUI file given as "
                   "--weights.")
@click.option("--stage-b", type=click.Choice(["lite", "large"]), default=None,
              help="Stage B size: lite (700M) or large (1.5B). Default: lite, or the size in the ComfyUI file given "
                   "as --weights.")
@click.option("--weights", "--model", "-w", default=None, metavar="DIR|REPO|FILE",
              help="Folder with the official files (stage_c_lite[_bf16].safetensors, stage_b_lite[_bf16].safetensors, "
                   "stage_a.safetensors, previewer.safetensors, effnet_encoder.safetensors for img2img; or the "
                   "diffusers or ComfyUI layout), a repo id, or ComfyUI's stable_cascade_stage_c.safetensors "
                   "(with stable_cascade_stage_b.safetensors and tokenizer/ beside it). "
                   "Default: $CASCADE_WEIGHTS, else stabilityai/stable-cascade.")
@click.option("--clip", "clip_source", default=None, metavar="DIR|REPO",
              help="Folder or repo with text_encoder/, tokenizer/ (and image_encoder/ for variations) in the Hugging "
                   "Face layout. Default: the --weights folder.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:STRENGTH]",
              help="LoRA for Stage C (official lora_*.safetensors, kohya/ComfyUI or diffusers/PEFT naming), merged at "
                   "STRENGTH (default 1); repeat for several. Tokens the file trained (e.g. [fernando]) are added to "
                   "the text encoder.")
@click.option("--device", default="auto", show_default=True, help="Torch device: auto (CUDA if available), cpu, cuda, …")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Stage C and Stage B precision. auto = bf16 on CUDA and on CPUs with native bf16 (AVX512_BF16 "
                   "or AMX-BF16), fp32 on other CPUs. fp16 (GPUs without bf16, "
                   "Apple MPS) runs Stage C in an overflow-safe mode: fp16 weights and matrix multiplies, fp32 "
                   "activations (plain fp16 overflows in Stage C).")
@user_errors
def generate(prompt, out, prompt_file, negative, size, num_images, steps_c, cfg_c, shift_c, steps_b, cfg_b, cfg_rho,
             sampler, seed, image, mode, strength, controlnet, control_image, control_strength, control_mask,
             control_threshold, outpaint, preview_dir, save_latents, batch_size, stage_c, stage_b, weights,
             clip_source, loras, device, dtype) -> None:
    """Generate images from PROMPT (or --prompts FILE): text → Stage C → Stage B → Stage A.

    Examples: cascade generate "a lighthouse at dusk" -o out.png --size 1216x832 --n 2;
    cascade generate --image photo.jpg --mode variation -o var.png.
    """
    from ..files import check_output
    from ..generation.pipeline import TextToImage
    from ..images import check_image_path, save_images
    from ..latents import save_latents
    from ..weights import default_source

    if prompt is None and prompt_file is None and image is None and control_image is None:
        raise click.UsageError("give a PROMPT, --prompts FILE or --image")
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give either PROMPT or --prompts FILE, not both")
    if mode is not None and image is None:
        raise click.UsageError(f"--mode {mode} needs --image")
    items = read_prompt_file(prompt_file) if prompt_file else [{"prompt": prompt or ""}]
    height, width = _parse_size(size)
    check_output(check_image_path(out))
    if preview_dir is not None:
        check_output(preview_dir, folder=True)
    from ..images import load_image
    from ..progress import progress_bar

    if (controlnet is None) != (control_image is None):
        raise click.UsageError("--controlnet and --control-image go together")
    picture = load_image(image) if image is not None else None
    control = load_image(control_image) if control_image is not None else None
    mask = load_image(control_mask) if control_mask is not None else None
    source = default_source(weights)
    pipe = TextToImage.from_pretrained(source, stage_c=stage_c, stage_b=stage_b,
                                       dtype=None if dtype == "auto" else dtype,
                                       device=None if device == "auto" else device, clip_source=clip_source,
                                       keep_loaded=len(items) > 1, loras=[_parse_lora(v) for v in loras])
    for note in pipe.notes():
        click.secho(f"note: {note}", fg="yellow", err=True)
    t0 = time.perf_counter()
    written = []
    for k, item in enumerate(items):
        item_seed = item.get("seed", seed + k if len(items) > 1 else seed)
        target = out if len(items) == 1 else out.with_name(f"{out.stem}_p{k:03d}{out.suffix}")
        steps_in_c = max(1, int(steps_c * strength)) if mode == "img2img" else steps_c
        bar = progress_bar(num_images * (steps_in_c + steps_b), f"prompt {k + 1}/{len(items)}", unit="step")

        def progress(stage: str, i: int, total: int) -> None:
            bar.update(1)

        def preview(step: int, total: int, images, k: int = k) -> None:
            preview_dir.mkdir(parents=True, exist_ok=True)
            for j, im in enumerate(images):
                im.save(preview_dir / f"p{k:03d}_img{j:03d}_step{step:03d}.png")

        result = pipe.generate(item["prompt"], item.get("negative", negative), height=height, width=width,
                               num_images=num_images, steps_c=steps_c, cfg_c=cfg_c, shift_c=shift_c,
                               steps_b=steps_b, cfg_b=cfg_b, cfg_rho=cfg_rho, sampler=sampler, seed=item_seed,
                               image=picture, mode=mode, strength=strength, batch_size=batch_size,
                               preview=preview if preview_dir else None, progress=progress,
                               controlnet=controlnet, control_image=control, control_strength=control_strength,
                               control_mask=mask, control_threshold=control_threshold, outpaint=outpaint)
        bar.close()
        texts = _png_text(item["prompt"], item.get("negative", negative), item_seed, result.settings)
        paths = save_images(result.images, target, texts=texts)
        if save_latents:
            size_hw = [result.settings.height, result.settings.width]
            for path, z in zip(paths, result.latents.split(1)):
                save_latents(path.with_suffix(".safetensors"), [z], [item["prompt"]], [size_hw], 0.75)
        written += paths
    click.echo(f"wrote {len(written)} image(s): {written[0]}{' …' if len(written) > 1 else ''} "
               f"({time.perf_counter() - t0:.1f} s)")

