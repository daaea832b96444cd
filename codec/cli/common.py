"""What every ``cascade`` command shares: the error policy, the weights/device/precision options, the Stage B
sampling options and loading the codec. Commands use only these and the public APIs of the packages."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from ..errors import CascadeError

MINI_HELP = ("`mini`: the small codec shipped in the package (trained from scratch by this project on Debian's "
             "freely licensed photos, 256² native; works offline; far below Stable Cascade's quality; a folder "
             "named mini is ./mini).")
WEIGHTS_HELP = ("Folder with the official Stable Cascade files (stage_a.safetensors, effnet_encoder.safetensors, "
                "stage_b_lite[_bf16].safetensors, …; or the diffusers or ComfyUI layout), a Hugging Face repo id, "
                "a ComfyUI single-file checkpoint (stable_cascade_stage_b.safetensors), or " + MINI_HELP
                + " Default: $CASCADE_WEIGHTS, else stabilityai/stable-cascade.")
DEVICE_HELP = "Torch device: auto (CUDA if available), cpu, cuda, cuda:1, mps, …"


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command so that a :class:`~codec.errors.CascadeError` becomes a one-paragraph message and exit
    status 1; any other exception is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CascadeError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def weights_option(f: Callable) -> Callable:
    """Shared --weights/--stage-b/--device/--dtype options."""
    f = click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
                     show_default=True,
                     help="Stage B precision. auto = bf16 on CUDA, fp32 on CPU (bf16 math is slow on most CPUs). "
                          "fp16 is allowed for Stage B only; the encoder and Stage A always run in fp32.")(f)
    f = click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)(f)
    f = click.option("--stage-b", type=click.Choice(["lite", "large", "mini"]), default=None,
                     help="Stage B size: lite (700M parameters) or large (1.5B); mini only in the built-in mini "
                          "codec. Default: lite, or the size in the ComfyUI file given as --weights, or mini for "
                          "--weights mini.")(f)
    f = click.option("--weights", "--model", "-w", default=None, metavar="DIR|REPO|FILE|mini",
                     help=WEIGHTS_HELP)(f)
    return f


def decode_options(f: Callable) -> Callable:
    """Stage B sampling options shared by decode, reconstruct and decode-dataset."""
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


def decode_kwargs(steps: int, cfg: float, no_cfg: bool, cfg_rho: float, sampler: str, seed: int,
                  caption: str | None, batch_size: int) -> dict[str, Any]:
    """The :meth:`codec.Codec.decode` keyword arguments of the :func:`decode_options`."""
    return dict(steps=steps, cfg=None if no_cfg else cfg, cfg_rho=cfg_rho, sampler=sampler, seed=seed,
                caption=caption, batch_size=batch_size)


def load_codec(weights: str | None, stage_b: str | None, device: str, dtype: str):
    """The :class:`codec.Codec` of the options (default weights: $CASCADE_WEIGHTS, else the official repo), with
    a note on the terminal when its weights are tiny random ones."""
    from ..codec import Codec

    codec = Codec.from_pretrained(weights, stage_b=stage_b, dtype=dtype, device=device)
    for note in {c.note for c in codec.components.values() if c.note}:
        click.secho(f"note: {note}", fg="yellow", err=True)
    return codec


def step_progress(total_steps: int, desc: str) -> tuple[Any, Callable[..., None]]:
    """A progress bar over sampling steps and the callback that advances it by one step."""
    from ..progress import progress_bar

    bar = progress_bar(total_steps, desc, unit="step")
    return bar, lambda *_: bar.update(1)
