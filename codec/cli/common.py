"""What every ``cascade`` command shares: the error policy, the weights/device/precision options, the Stage B
sampling options and loading the codec. Commands use only these and the public APIs of the packages."""

from __future__ import annotations

import errno
import functools
import os
from typing import Any, Callable

import click

from ..errors import CascadeError
from ..interrupts import handle_interrupts

MINI_HELP = ("`mini`: the small codec shipped in the package (trained from scratch by this project on Debian's "
             "freely licensed photos, 256² native; works offline; far below Stable Cascade's quality; a folder "
             "named mini is ./mini).")
WEIGHTS_HELP = ("Folder with the official Stable Cascade files (stage_a.safetensors, effnet_encoder.safetensors, "
                "stage_b_lite[_bf16].safetensors, …; or the diffusers or ComfyUI layout), a Hugging Face repo id, "
                "a ComfyUI single-file checkpoint (stable_cascade_stage_b.safetensors), or " + MINI_HELP
                + " Default: $CASCADE_WEIGHTS, else stabilityai/stable-cascade.")
DEVICE_HELP = "Torch device: auto (CUDA if available), cpu, cuda, cuda:1, mps, …"
COMPILE_HELP = ("Run the models through torch.compile. The first image of each size pays for compiling (minutes on a "
                "CPU); later ones may run faster, mostly on GPUs (docs/guides/benchmarks.md has measured figures). "
                "Off by default.")


RESUMES = "run the same command again to continue where it stopped"
NOTHING_WRITTEN = "nothing was written"


# A full disk or quota: the user's to fix, said as a sentence (everything written so far is complete files).
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def user_errors(fn: Callable[..., Any] | None = None, *, interrupted: str = NOTHING_WRITTEN) -> Callable[..., Any]:
    """Decorate a command so that a :class:`~codec.errors.CascadeError` becomes a one-paragraph message and exit
    status 1, and Ctrl-C a sentence saying what happens next (``interrupted``: :data:`RESUMES` for resumable
    jobs); any other exception is a bug and keeps its traceback. The command runs under
    :func:`codec.interrupts.handle_interrupts`, so its loops stop at the next batch even if the first
    ``KeyboardInterrupt`` was lost on its way up."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                with handle_interrupts():
                    return command(*args, **kwargs)
            except CascadeError as e:
                raise click.ClickException(str(e)) from None
            except KeyboardInterrupt:
                raise click.ClickException(f"interrupted; {interrupted}") from None
            except OSError as e:
                if e.errno not in FULL_DISK:  # anything else is not the user's to fix: a bug, with its traceback
                    raise
                where = f" writing {e.filename}" if e.filename else ""
                then = f", then {interrupted}" if interrupted == RESUMES else " and run the command again"
                raise click.ClickException(f"{os.strerror(e.errno).lower()}{where}; free some space or write to "
                                           f"another disk{then}") from None

        return wrapper

    return decorate(fn) if fn is not None else decorate


def compile_option(f: Callable) -> Callable:
    """The --compile flag (``compile`` keyword)."""
    return click.option("--compile", "compile_models", is_flag=True, help=COMPILE_HELP)(f)


def weights_option(f: Callable) -> Callable:
    """Shared --weights/--stage-b/--device/--dtype/--compile options."""
    f = compile_option(f)
    f = click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
                     show_default=True,
                     help="Stage B precision. auto = bf16 on CUDA and on CPUs with native bf16 (AVX512_BF16 or "
                          "AMX-BF16), fp32 on other CPUs (emulated bf16 is slower than fp32); `cascade info` says "
                          "which. fp16 is allowed for Stage B only; the encoder and Stage A always run in fp32.")(f)
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
        click.option("--steps", type=click.IntRange(1, 1000), default=None,
                     help="Stage B sampling steps. Default: the model's own (official: 10).", show_default=False),
        click.option("--cfg", type=float, default=None,
                     help="Stage B classifier-free guidance scale. Default: the model's own (official: 1.1); 1 is the "
                          "conditional prediction alone (one model call per step)."),
        click.option("--no-cfg", is_flag=True, help="Disable guidance (one model call per step, ~2× faster)."),
        click.option("--cfg-rho", type=click.FloatRange(0, 1), default=0.7, show_default=True,
                     help="Guidance rescale factor in [0, 1]: how far the guided prediction's spread is pulled back "
                          "to the conditional one's (0: off; official: 0.7)."),
        click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default=None,
                     help="ddpm (stochastic) or ddim (deterministic). Default: the model's own (official: ddpm)."),
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


def decode_kwargs(codec: Any, steps: int | None, cfg: float | None, no_cfg: bool, cfg_rho: float,
                  sampler: str | None, seed: int, caption: str | None, batch_size: int) -> dict[str, Any]:
    """The :meth:`codec.Codec.decode` keyword arguments of the :func:`decode_options`, an option not given
    replaced by ``codec``'s own sampler default (:attr:`codec.Codec.sampler_defaults`)."""
    defaults = codec.sampler_defaults
    return dict(steps=defaults["steps"] if steps is None else steps,
                cfg=None if no_cfg else (defaults["cfg"] if cfg is None else cfg), cfg_rho=cfg_rho,
                sampler=defaults["sampler"] if sampler is None else sampler, seed=seed, caption=caption,
                batch_size=batch_size)


def load_codec(weights: str | None, stage_b: str | None, device: str, dtype: str, recorded: str | None = None,
               decoder: bool = True, compile_models: bool = False):
    """The :class:`codec.Codec` of the options (default weights: ``recorded``, the model that made the latents at
    hand, else $CASCADE_WEIGHTS, else the official repo), with a note on the terminal when its weights are tiny
    random ones or not the ones that made the latents. ``decoder=False``: only the encoder; ``compile_models``: the
    ``--compile`` flag (``Codec(compile=True)``)."""
    from ..codec import Codec
    from ..weights import WEIGHTS_ENV, default_source

    if weights is None and recorded and not os.environ.get(WEIGHTS_ENV):
        weights = recorded
        click.secho(f"note: decoding with {recorded}, the model that encoded these latents", fg="yellow", err=True)
    elif recorded and default_source(weights) != recorded:
        click.secho(f"warning: these latents were made by {recorded}, not by {default_source(weights)}; latents of "
                    "one model mean nothing to another", fg="yellow", err=True)
    codec = Codec.from_pretrained(weights, stage_b=stage_b, dtype=dtype, device=device, decoder=decoder,
                                  compile=compile_models)
    for note in {c.note for c in codec.components.values() if c.note}:
        click.secho(f"note: {note}", fg="yellow", err=True)
    return codec


def step_progress(total_steps: int, desc: str) -> tuple[Any, Callable[..., None]]:
    """A progress bar over sampling steps and the callback that advances it by one step."""
    from ..progress import progress_bar

    bar = progress_bar(total_steps, desc, unit="step")
    return bar, lambda *_: bar.update(1)
