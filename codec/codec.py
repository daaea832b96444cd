"""The Python API: ``Codec.from_pretrained(...)``, ``encode``, ``decode``, ``reconstruct``.

Encoding runs the EfficientNet encoder on the image resized to 3/4 of the output size
(snapped down to a multiple of 32, nearest-neighbour as in the official reconstruction
notebook), so a 1024² image becomes a 16×24×24 latent. Decoding runs Stage B's sampler
(official defaults: 10 DDPM steps, CFG 1.1 with rescale 0.7, shift 1) to a Stage A
latent and Stage A's decoder to pixels. Any output size works: the Stage A latent is
made even-sized (Stage B patchifies by 2) and the image is cropped back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from . import weights as W
from .controlnet import CONTROLNET_FILES, ControlNet
from .devices import resolve_device
from .diffusion import sample
from .effnet import EfficientNetEncoder
from .errors import UsageError, check_finite
from .files import atomic_write
from .images import ImageLike, to_pil, to_tensor_list
from .layouts import locate as layouts
from .layouts import official
from .memory import activation_bytes, available_bytes
from .presets import CONTROLNET_KINDS, get_preset
from .progress import progress_bar
from .stage_a import StageA
from .stage_b import StageB
from .tiled_decode import decode_tiled, stage_a_halo, tile_side

ENCODER_FRACTION = 0.75  # the encoder sees 3/4 of the output size (1024 → 768 → 24×24)
# Stage B's sampler as the official pipeline runs it; a Stage B file may name its own (W.META_SAMPLING).
OFFICIAL_SAMPLING: dict[str, Any] = {"steps": 10, "cfg": 1.1, "sampler": "ddpm", "prediction": "epsilon",
                                     "x0_clamp": None}
DEFAULT = "default"  # a decode argument left to the model's own sampler defaults (Codec.sampler_defaults)
LATENT_STRIDE = 32
# Stage A's largest tensors above this are decoded in tiles (Codec.stage_a_bytes): a 1024² official decode
# (1.2 GB) stays in one piece, a 20000² one needs 1.6 GB a tile instead of ~440 GB.
STAGE_A_BYTES = 2 * 2**30
IMAGE_BYTES_PER_PIXEL = 30  # a decoded image in host memory: fp32 (12 B), its uint8 copy being made (12 + 3), PIL (3)


def encoder_input_size(height: int, width: int, scale: float = ENCODER_FRACTION) -> tuple[int, int]:
    """Size the encoder sees for an image of ``height``×``width``: ``floor(side·scale/32)·32``, at least 32."""
    return (max(LATENT_STRIDE, int(height * scale // LATENT_STRIDE) * LATENT_STRIDE),
            max(LATENT_STRIDE, int(width * scale // LATENT_STRIDE) * LATENT_STRIDE))


def default_output_size(latent_h: int, latent_w: int) -> tuple[int, int]:
    """Output size a latent stands for when none is given: ``round(side · 32 / 0.75)`` (24 → 1024)."""
    return round(latent_h * LATENT_STRIDE / ENCODER_FRACTION), round(latent_w * LATENT_STRIDE / ENCODER_FRACTION)


def stage_a_latent_size(height: int, width: int, multiple: int = 2, minimum: int = 16) -> tuple[int, int]:
    """Stage A latent size for an output size: ``ceil(side/4)`` rounded up to a multiple of Stage B's patch
    size (2) and at least Stage B's total stride (16), so every level keeps at least one pixel.
    The decoded image is then cropped to the requested size."""
    return tuple(max(minimum, multiple * math.ceil(math.ceil(s / 4) / multiple))  # type: ignore[return-value]
                 for s in (height, width))


@dataclass
class ComponentInfo:
    """Where a loaded component came from."""

    file: str
    params: int
    dtype: str
    note: str | None
    layout: str = "official"
    detail: str | None = None


def load_component(src: W.WeightSource, where: str | official.Located, cls: Callable[..., torch.nn.Module],
                    preset: dict[str, Any] | None, dtype: torch.dtype,
                    device: torch.device | str) -> tuple[torch.nn.Module, ComponentInfo]:
    """Load one model from an official file name or a located variant in either layout (its stored config over
    ``preset``; diffusers keys mapped while streaming) and describe where it came from."""
    loc = where if isinstance(where, official.Located) else official.Located.official_file(where)
    ckpt, config = layouts.open_component(src, loc)
    model = W.load_module(W.configured_builder(cls, config, preset), ckpt, dtype, device, f"{loc.label} ({cls.__name__})")
    info = ComponentInfo(str(ckpt.path), sum(p.numel() for p in model.parameters()), str(dtype).replace("torch.", ""),
                         ckpt.metadata.get(W.META_NOTE), loc.layout)
    return model, info


def load_encoder(source: str | os.PathLike | W.WeightSource,
                 device: str | torch.device = "cpu") -> EfficientNetEncoder:
    """Only the EfficientNet encoder (fp32, eval, channels_last) from a weights folder, repo id or ComfyUI
    Stage C checkpoint."""
    src = source if isinstance(source, W.WeightSource) else W.WeightSource(source)
    model, _ = load_component(src, layouts.locate_encoder(src), EfficientNetEncoder, None, torch.float32, device)
    return model.to(memory_format=torch.channels_last)


def load_previewer(src: W.WeightSource, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The Previewer (fp32, eval) from ``previewer.safetensors`` or a ComfyUI Stage C checkpoint."""
    from .previewer import Previewer

    loc = layouts.resolve(src, "previewer", torch.float32, W.PREVIEWER_FILE)
    layouts.require(src, [loc])
    return load_component(src, loc, Previewer, None, torch.float32, device)[0]


def load_controlnet(source: str | os.PathLike, kind: str | None = None, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None) -> ControlNet:
    """A ControlNet from a weights folder or repo id (``controlnet/<kind>.safetensors``) or a file.

    ``kind`` is canny, inpainting or super_resolution; for a file path it defaults to the file's stem. A
    configuration stored in the file (our own files) overrides the official preset. ``dtype`` defaults to bf16
    on CUDA and fp32 elsewhere. The model is returned in eval mode without gradients, its ``kind`` set.
    """
    device = resolve_device(device)
    dtype = W.parse_dtype(dtype, device)
    path = Path(source).expanduser()
    if path.is_file():
        kind = kind or path.stem
        src, filename = W.WeightSource(path.parent), path.name
    else:
        if kind not in CONTROLNET_FILES:
            raise W.WeightsError(f"ControlNet kind {kind!r} has no released file; choose one of "
                                 f"{sorted(CONTROLNET_FILES)} or give the path of a .safetensors file.")
        src, filename = W.WeightSource(source), CONTROLNET_FILES[kind]
        src.require([filename])
    known = kind in CONTROLNET_KINDS
    if not known and W.read_header(src.path(filename)).config is None:
        raise W.WeightsError(f"{src.path(filename)} does not say which ControlNet it is; pass its kind "
                             f"(one of {', '.join(CONTROLNET_KINDS)}).")
    preset = get_preset(f"controlnet_{kind}").kwargs() if known else None
    model, _ = load_component(src, filename, ControlNet, preset, dtype, device)
    model.kind = kind if known else None
    return model


def locate_stage_a(src: W.WeightSource) -> official.Located:
    """Where Stage A is in ``src`` (official file, else diffusers' ``vqgan/``), made sure to be there."""
    loc = layouts.resolve(src, "stage_a", torch.float32, W.STAGE_A_FILE)
    layouts.require(src, [loc])
    return loc


def load_stage_a(source: str | os.PathLike | W.WeightSource, device: str | torch.device = "cpu") -> StageA:
    """Only Stage A (fp32, eval) from a weights folder or repo id, in either layout."""
    src = source if isinstance(source, W.WeightSource) else W.WeightSource(source)
    model, _ = load_component(src, locate_stage_a(src), StageA, None, torch.float32, device)
    return model


@torch.no_grad()
def encode_pixels(effnet: EfficientNetEncoder, pixels: torch.Tensor,
                  encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """RGB ``(B,3,H,W)`` in [0,1], already at the encoder's input size → fp32 latents on the CPU (not checked).

    ``encode``: what runs ``effnet.encode`` (default: that method itself; :func:`compile_model` gives a compiled
    one)."""
    device = next(effnet.parameters()).device
    x = pixels.to(device, torch.float32).contiguous(memory_format=torch.channels_last)
    return (encode or effnet.encode)(x).float().contiguous().cpu()


def compile_model(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of a model or a model's method (``stage_a.decode``, ``effnet.encode``) as ``compile=True``
    runs them: inductor, default mode, the model's weights shared, its state dict unchanged. The first call at each
    new input shape compiles (tens of seconds to minutes on a CPU, once per process); the results equal eager
    ones up to float rounding."""
    return torch.compile(fn)


class Codec:
    """Stable Cascade's image codec: EfficientNet encoder, Stage B diffusion decoder, Stage A decoder."""

    def __init__(self, stage_a: StageA | None, effnet: EfficientNetEncoder | None, stage_b: StageB | None, *,
                 empty_clip: torch.Tensor | None = None, source: W.WeightSource | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 components: dict[str, ComponentInfo] | None = None, sampling: dict[str, Any] | None = None,
                 dtype_reason: str | None = None, compile: bool = False):
        self.stage_a = stage_a
        self.sampling = dict(sampling or {})  # Stage B's own sampler defaults (W.META_SAMPLING)
        self.effnet = effnet
        self.stage_b = stage_b
        self.empty_clip = empty_clip
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.dtype_reason = dtype_reason or f"{str(dtype).replace('torch.', '')}: given to Codec()"
        self.components = components or {}
        self._text_encoder = None
        self._previewer = None
        self._bytes_per_pixel: tuple[float, float] | None = None  # see _decode_bytes_per_latent_pixel
        self.stage_a_bytes = STAGE_A_BYTES  # largest Stage A tensors a decode may hold at once; above: tiles
        self.compile = compile  # run the models through torch.compile (see from_pretrained)
        self._compiled: dict[str, tuple[Any, Callable[..., torch.Tensor]]] = {}

    def _runner(self, name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``fn`` (a model, or a bound method of one), or with ``compile=True`` its compiled version, made on first
        use and kept for as long as the codec holds that same model (the memory probe runs the eager models)."""
        if not self.compile:
            return fn
        owner = getattr(fn, "__self__", fn)
        cached = self._compiled.get(name)
        if cached is None or cached[0] is not owner:
            cached = self._compiled[name] = (owner, compile_model(fn))
        return cached[1]

    # ------------------------------------------------------------------ loading
    @property
    def sampler_defaults(self) -> dict[str, Any]:
        """Stage B's sampler settings that :meth:`decode` uses when not given: the official ones (10 DDPM steps,
        CFG 1.1, epsilon prediction), updated by what the Stage B file records (``cascade_codec.sampling``; the
        built-in ``mini`` codec names its own)."""
        return {**OFFICIAL_SAMPLING, **self.sampling}

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, stage_b: str | None = None,
                        dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                        encoder: bool = True, decoder: bool = True, compile: bool = False) -> "Codec":
        """Load the codec from a folder, a Hugging Face repo id or a ComfyUI single-file checkpoint.

        Official layout: ``stage_a.safetensors``, ``effnet_encoder.safetensors``,
        ``stage_b_<lite>[_bf16].safetensors`` at the root. diffusers layout: ``vqgan/`` and
        ``decoder_lite/`` / ``decoder/`` folders (keys mapped while loading); it has no
        EfficientNet encoder, so such a codec decodes but :meth:`encode` explains which file
        to add. ComfyUI layout: ``stable_cascade_stage_b[_lite].safetensors`` (Stage B and
        Stage A; the encoder is in ``stable_cascade_stage_c.safetensors`` beside it, if there),
        given as the file or its folder. Where a folder has several, the official files come
        first, then diffusers, then ComfyUI; a file given as ``source`` comes before all.
        Stage A runs with the scale factor its own config names (0.43 official, 0.3764 for
        diffusers' Würstchen v2 VQGAN); :meth:`info` says which.

        ``source="mini"`` loads the small codec shipped in the package (no network; trained by
        this project, 256² native, far below Stable Cascade's quality); a folder named mini is
        ``"./mini"``.

        ``stage_b``: ``"lite"`` (700M) or ``"large"`` (1.5B); default lite, or the size of
        the ComfyUI file given as ``source``, or ``"mini"`` for the mini codec. ``dtype`` is Stage B's
        precision: ``"auto"``/``None`` (default) is bf16 on CUDA and on CPUs with native bf16 (AVX512_BF16 or
        AMX-BF16), fp32 elsewhere (:func:`codec.devices.auto_dtype`; :attr:`dtype_reason` says which and why);
        fp16 is allowed for Stage B only; the EfficientNet encoder and Stage A stay fp32 as in the official code.
        ``device`` (``None``/``"auto"``: CUDA when available) is checked to exist. ``source=None`` means
        ``$CASCADE_WEIGHTS``, else the official repo id. ``encoder=False`` skips the EfficientNet encoder
        (decode-only use, e.g. after Stage C); ``decoder=False`` loads only the encoder (encode-only use: no Stage A
        or B file is needed). ``compile=True`` runs Stage B's denoiser, Stage A's decoder and the encoder through
        ``torch.compile`` (:func:`compile_model`): the first decode or encode at each size pays for compiling
        (minutes on a CPU), later ones may run faster; off by default (docs/guides/benchmarks.md has the figures).
        """
        device = resolve_device(device)
        dtype, why = W.resolve_dtype(dtype, device)
        src = W.WeightSource(W.default_source(source))
        if not decoder:
            effnet, info = load_component(src, layouts.locate_encoder(src), EfficientNetEncoder, None, torch.float32,
                                          device)
            return cls(None, effnet.to(memory_format=torch.channels_last), None, source=src, device=device,
                       dtype=dtype, components={"effnet": info}, dtype_reason=why, compile=compile)
        stage_b = stage_b or layouts.default_size(src, "stage_b")
        b_file = src.stage_b_file(stage_b, dtype)
        a_loc = layouts.resolve(src, "stage_a", torch.float32, W.STAGE_A_FILE)
        b_loc = layouts.resolve(src, f"stage_b_{stage_b}", dtype, b_file)
        e_loc = layouts.resolve(src, "effnet", torch.float32, W.EFFNET_FILE)
        # Neither layout of the other two has an encoder of its own: without one, the codec only decodes.
        encoder_optional = a_loc.layout != "official" and b_loc.layout != "official"
        load_effnet = encoder and (e_loc.layout != "official" or src.has(e_loc.files[0]) or not encoder_optional)
        layouts.require(src, [a_loc, b_loc] + ([e_loc] if load_effnet else []))
        components: dict[str, ComponentInfo] = {}
        stage_a, components["stage_a"] = load_component(src, a_loc, StageA, None, torch.float32, device)
        components["stage_a"].detail = official.describe_stage_a(stage_a.scale_factor)
        effnet = None
        if load_effnet:
            effnet, components["effnet"] = load_component(src, e_loc, EfficientNetEncoder, None, torch.float32,
                                                            device)
            effnet = effnet.to(memory_format=torch.channels_last)
        model_b, components["stage_b"] = load_component(src, b_loc, StageB,
                                                         get_preset(f"stage_b_{stage_b}").kwargs(), dtype, device)
        empty = None
        if src.has(W.EMPTY_CAPTION_FILE):
            empty = next(W.iter_tensors(W.read_header(src.path(W.EMPTY_CAPTION_FILE)), torch.float32, device))[1]
        sampling = {}
        if b_loc.layout == "official":
            sampling = json.loads(src.header(b_loc.files[0]).metadata.get(W.META_SAMPLING, "{}"))
        return cls(stage_a, effnet, model_b, empty_clip=empty, source=src, device=device, dtype=dtype,
                   components=components, sampling=sampling, dtype_reason=why, compile=compile)

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, images: ImageLike | Sequence[ImageLike], scale: float = ENCODER_FRACTION,
               resize: str = "nearest", batch_size: int = 8) -> torch.Tensor | list[torch.Tensor]:
        """Images → EfficientNet latents ``(B,16,h,w)``, h = floor(H·scale/32) (24 for 1024² at scale 0.75).

        ``images``: paths, PIL images, uint8 or float arrays/tensors (HWC, CHW or batched),
        or a list of them. ``resize``: ``"nearest"`` (official reconstruction) or
        ``"bilinear"`` (antialiased). Returns one tensor when all images have the same
        size, else a list of ``(1,16,h,w)`` tensors in input order.
        """
        if self.effnet is None:
            if self.source is not None and layouts.locate(self.source, "effnet", torch.float32) is None and \
                    layouts.has_other_layout(self.source):
                raise W.WeightsError(layouts.no_effnet_message(self.source))
            raise W.WeightsError("this codec was loaded without its encoder (encoder=False); load it with "
                                 "Codec.from_pretrained(..., encoder=True) to encode images")
        if not 0 < scale <= 1.5:
            raise UsageError(f"scale must be in (0, 1.5], got {scale}")
        if resize not in ("nearest", "bilinear"):
            raise UsageError(f"resize must be 'nearest' or 'bilinear', got {resize!r}")
        tensors = to_tensor_list(images)
        if not tensors:
            raise UsageError("no images given")
        out: list[torch.Tensor] = []
        i = 0
        while i < len(tensors):
            j = i + 1
            while j < len(tensors) and j - i < batch_size and tensors[j].shape == tensors[i].shape:
                j += 1
            out.append(self._encode_batch(torch.stack(tensors[i:j]), scale, resize))
            i = j
        if len({tuple(t.shape[1:]) for t in out}) == 1:
            return torch.cat(out)
        return [t for batch in out for t in batch.split(1)]

    def _encode_batch(self, x: torch.Tensor, scale: float, resize: str) -> torch.Tensor:
        size = encoder_input_size(x.shape[-2], x.shape[-1], scale)
        if resize == "nearest":
            x = F.interpolate(x, size=size, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return check_finite(encode_pixels(self.effnet, x, self._runner("effnet", self.effnet.encode)),
                            "the EfficientNet encoder")

    # ------------------------------------------------------------------ text
    def pooled_text(self, caption: str | Sequence[str] | None, batch: int) -> torch.Tensor:
        """Stage B's text condition ``(batch,1,C)``: the pooled CLIP-G embedding of the caption(s).

        ``None`` or ``""`` uses the cached embedding of the empty caption (computed once
        with the text encoder and saved beside the weights as ``clip_pooled_empty.safetensors``).
        """
        if caption is None or caption == "":
            return self._empty_pooled().expand(batch, -1, -1)
        captions = [caption] * batch if isinstance(caption, str) else list(caption)
        if len(captions) != batch:
            raise UsageError(f"got {len(captions)} captions for {batch} latents")
        return self._text().encode(captions).pooled.to(self.device)

    def _text(self):
        if self._text_encoder is None:
            from .text import TextEncoder

            if self.source is None:
                raise W.WeightsError("this codec was not loaded from a weight source; pass clip= instead of a caption")
            self._text_encoder = TextEncoder.from_pretrained(self.source, device=self.device)
        return self._text_encoder

    def _empty_pooled(self) -> torch.Tensor:
        if self.empty_clip is None:
            if self.source is None:
                raise W.WeightsError("no pooled embedding of the empty caption is available; pass clip=")
            try:
                pooled = self._text().encode([""]).pooled
            except W.WeightsError as e:
                raise W.WeightsError(
                    "Stage B needs the pooled CLIP-G embedding of the empty caption. It is computed once from the "
                    "text encoder and then cached as " + W.EMPTY_CAPTION_FILE + " beside the weights, but:\n"
                    + str(e)) from None
            self.empty_clip = pooled.reshape(1, 1, -1).float()
            if self.source.folder is not None and os.access(self.source.folder, os.W_OK):
                from safetensors.torch import save_file

                target = self.source.folder / W.EMPTY_CAPTION_FILE
                with atomic_write(target) as tmp:
                    save_file({"pooled": self.empty_clip.cpu().contiguous()}, str(tmp),
                              metadata={W.META_NOTE: "pooled CLIP-G text embedding of the empty caption"})
        return self.empty_clip.reshape(1, 1, -1).to(self.device)

    # ------------------------------------------------------------------ decode
    def check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Validate EfficientNet latents; returns them as ``(B,C,h,w)`` float32."""
        c = self.stage_b.config.c_effnet if self.stage_b is not None else self.effnet.config["c_latent"]
        if not torch.is_tensor(latents):
            raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
        if latents.ndim == 3:
            latents = latents[None]
        if latents.ndim != 4 or latents.shape[1] != c:
            raise UsageError(f"expected EfficientNet latents of shape (B, {c}, h, w) or ({c}, h, w), got "
                             f"{list(latents.shape)}")
        if not latents.is_floating_point():
            raise UsageError(f"latents must be floating point, got {latents.dtype}")
        latents = latents.float()
        if not torch.isfinite(latents).all():
            raise UsageError("latents contain NaN or inf")
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor | Sequence[torch.Tensor], height: int | None = None,
               width: int | None = None, steps: int | None = None, cfg: float | str | None = DEFAULT,
               seed: int | None = 0, caption: str | Sequence[str] | None = None,
               clip: torch.Tensor | None = None, sampler: str | None = None, cfg_rho: float = 0.7, shift: float = 1.0,
               batch_size: int = 4, output: str = "pil", progress: Callable[[int, int], None] | None = None,
               generator: torch.Generator | None = None, x0_clamp: float | None = None,
               progress_bars: bool | None = None) -> list[Image.Image] | torch.Tensor:
        """EfficientNet latents ``(B,16,h,w)`` → images of ``height``×``width`` (default: h·32/0.75).

        A list of latents (what :meth:`encode` returns for images of several sizes) is decoded in order, from one
        random stream; with ``output="tensor"`` the result is then one tensor if all sizes agree, else a list.

        Stage B samples a Stage A latent conditioned on the latents and on the pooled
        text ``clip`` (``(B,1,C)``/``(1,1,C)``; default: the caption's, or the empty
        caption's). ``seed`` seeds one CPU generator for the whole call (initial noise,
        then one draw per DDPM step, batch by batch); ``None`` uses torch's global RNG.
        ``output``: ``"pil"`` (list of images) or ``"tensor"`` (``(B,3,H,W)`` in [0,1]).
        ``generator`` (a CPU generator) replaces ``seed`` to continue an RNG stream, as the
        official pipeline does from Stage C into Stage B. ``steps``, ``cfg`` (a scale, ``None`` for no
        guidance), ``sampler`` and ``x0_clamp`` (see :func:`sample`) default to :attr:`sampler_defaults`: the
        official 10 DDPM steps with CFG 1.1, or what the Stage B file names (the built-in ``mini`` codec's).

        ``progress(done, total)`` is called after each sampling step. An output too large for Stage A to decode in
        one piece (:meth:`check_memory`) is decoded in tiles with a progress bar over them, and, without a
        ``progress`` callback, one over the sampling steps; ``progress_bars``: ``None`` shows them on a terminal,
        ``True`` always, ``False`` never.
        """
        if isinstance(latents, (list, tuple)):  # what encode() returns for images of several sizes
            if generator is None and seed is not None:
                generator = torch.Generator().manual_seed(seed)
            kwargs = dict(height=height, width=width, steps=steps, cfg=cfg, seed=None, caption=caption, clip=clip,
                          sampler=sampler, cfg_rho=cfg_rho, shift=shift, batch_size=batch_size, output=output,
                          progress=progress, generator=generator, x0_clamp=x0_clamp, progress_bars=progress_bars)
            parts = [self.decode(z, **kwargs) for z in latents]
            if output == "pil":
                return [img for part in parts for img in part]
            return torch.cat(parts) if len({p.shape[1:] for p in parts}) == 1 else [x for p in parts for x in p]
        if self.stage_b is None or self.stage_a is None:
            raise W.WeightsError("this codec was loaded without its decoder (decoder=False); load it with "
                                 "Codec.from_pretrained(..., decoder=True) to decode latents")
        latents = self.check_latents(latents)
        defaults = self.sampler_defaults
        steps = defaults["steps"] if steps is None else steps
        cfg = defaults["cfg"] if cfg == DEFAULT else cfg
        sampler = defaults["sampler"] if sampler is None else sampler
        x0_clamp = defaults["x0_clamp"] if x0_clamp is None else x0_clamp
        n = latents.shape[0]
        dh, dw = default_output_size(*latents.shape[-2:])
        height, width = height or dh, width or dw
        if height < 8 or width < 8:
            raise UsageError(f"output size {height}×{width} is too small (minimum 8×8)")
        if clip is None:
            clip = self.pooled_text(caption, n)
        clip = clip.float().to(self.device)
        if clip.ndim == 2:
            clip = clip[:, None]
        if clip.shape[0] == 1 and n > 1:
            clip = clip.expand(n, -1, -1)
        uncond_clip = self.pooled_text(None, 1).expand(n, -1, -1) if cfg is not None else None
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        cfg_b = self.stage_b.config
        ha, wa = stage_a_latent_size(height, width, cfg_b.patch_size,
                                     cfg_b.patch_size * 2 ** (len(cfg_b.c_hidden) - 1))
        tile = self.check_memory(min(n, batch_size), height, width, ha, wa)
        # A decode big enough to tile is long: without a callback of the caller's, a bar shows its steps too.
        steps_bar = progress_bar(steps * math.ceil(n / batch_size), "Stage B", unit="step",
                                 enabled=False if progress is not None or tile is None else progress_bars)
        step_done = progress or (lambda *_: steps_bar.update(1))
        images = []
        with steps_bar:
            for start in range(0, n, batch_size):
                sl = slice(start, min(n, start + batch_size))
                eff = latents[sl].to(self.device)
                cond = {"effnet": eff, "clip": clip[sl]}
                uncond = {"effnet": torch.zeros_like(eff), "clip": uncond_clip[sl]} if cfg is not None else None
                z = sample(self._runner("stage_b", self.stage_b), cond,
                           shape=(eff.shape[0], self.stage_b.config.c_in, ha, wa), uncond=uncond,
                           steps=steps, cfg=cfg, cfg_rho=cfg_rho, shift=shift, sampler=sampler, generator=generator,
                           device=self.device, x0_clamp=x0_clamp, prediction=defaults["prediction"],
                           callback=lambda i, *_: step_done(i + 1, steps))
                check_finite(z, "Stage B")
                if tile is None:
                    img = check_finite(self._runner("stage_a", self.stage_a.decode)(z.float()).float(), "Stage A")
                    images.append(img[..., :height, :width].clamp(0, 1).cpu())
                else:
                    img = decode_tiled(self.stage_a, z.float(), tile, crop=(height, width), progress=progress_bars)
                    images.append(img.clamp_(0, 1))
        result = images[0] if len(images) == 1 else torch.cat(images)  # one huge image is not copied
        return to_pil(result) if output == "pil" else result

    def check_memory(self, batch: int, height: int, width: int, ha: int, wa: int) -> int | None:
        """Refuse, before any work, a decode of ``batch`` images of ``height``×``width`` (Stage A latent ``ha``×``wa``)
        that clearly cannot fit in the device's free memory (:mod:`codec.memory`); say how Stage A will fit.

        Stage B samples the whole latent at once, so its largest tensors must fit. Stage A is decoded in one piece
        when its largest tensors need at most :attr:`stage_a_bytes` (and fit), else in tiles that do
        (:mod:`codec.tiled_decode`). The decoded images themselves (float and 8-bit copies) must fit in host
        memory. Returns the Stage A tile side in latent pixels, or ``None`` for one piece."""
        free = available_bytes(self.device)
        host_free = free if self.device.type == "cpu" else available_bytes(torch.device("cpu"))
        per_b, per_a = self._decode_bytes_per_latent_pixel()
        pixels = batch * ha * wa
        images = IMAGE_BYTES_PER_PIXEL * batch * height * width
        size = f"{batch} image(s) of {width}×{height}"
        fixes = ("decode at a smaller size (--height/--width, or fewer pixels per image), with --batch-size 1, or on "
                 "a machine with more memory")
        need_b = int(per_b * pixels)
        if free is not None and need_b > free:
            raise UsageError(
                f"decoding {size} needs about {need_b / 2**30:.1f} GiB for the largest tensors of Stage B's "
                f"sampling, which runs on the whole latent, and {self.device} has {free / 2**30:.1f} GiB free: {fixes}")
        if host_free is not None and images > host_free:
            raise UsageError(
                f"decoding {size} needs about {images / 2**30:.1f} GiB for the decoded image(s) themselves "
                f"({IMAGE_BYTES_PER_PIXEL} bytes a pixel while they are converted), and this machine has "
                f"{host_free / 2**30:.1f} GiB free: {fixes}")
        budget = self.stage_a_bytes
        if free is not None:
            budget = min(budget, free - (images if self.device.type == "cpu" else 0))
        tile = None
        if per_a * pixels > budget:
            tile = tile_side(per_a * batch, budget, stage_a_halo(self.stage_a))
            if tile is None:
                raise UsageError(
                    f"decoding {size} leaves {max(0, budget) / 2**30:.1f} GiB of {self.device}'s memory for Stage A "
                    f"once the decoded image(s) ({images / 2**30:.1f} GiB) are held: too little for even a small tile "
                    f"of it. {fixes[0].upper()}{fixes[1:]}")
        return tile

    def _decode_bytes_per_latent_pixel(self) -> tuple[float, float]:
        """Largest-tensor bytes of Stage B (with CFG's doubled batch) and of Stage A per Stage A latent pixel of one
        image, measured once per codec on a 16² probe (:func:`codec.memory.activation_bytes`)."""
        if self._bytes_per_pixel is None:
            p = 16  # probe side in Stage A latent pixels; Stage B needs a multiple of its down-sampling
            dt = next(self.stage_b.parameters()).dtype
            z = torch.zeros(1, self.stage_b.config.c_in, p, p, device=self.device, dtype=dt)
            eff = torch.zeros(1, 16, 1, 1, device=self.device, dtype=dt)
            clip = torch.zeros(1, 1, self.stage_b.config.c_clip, device=self.device, dtype=dt)
            r = torch.zeros(1, device=self.device)
            self._bytes_per_pixel = (
                activation_bytes(self.stage_b, lambda: self.stage_b(z, r, eff, clip), 2) / (p * p),  # CFG: ×2
                activation_bytes(self.stage_a, lambda: self.stage_a.decode(z.float()), 1) / (p * p))
        return self._bytes_per_pixel

    def reconstruct(self, images: ImageLike | Sequence[ImageLike], scale: float = ENCODER_FRACTION,
                    resize: str = "nearest", **decode_kwargs: Any) -> list[Image.Image] | torch.Tensor:
        """Encode then decode each image at its own size (keyword arguments go to :meth:`decode`)."""
        tensors = to_tensor_list(images)
        out: list = []
        for t in tensors:
            latent = self.encode(t[None], scale=scale, resize=resize)
            out.append(self.decode(latent, height=t.shape[-2], width=t.shape[-1], **decode_kwargs))
        if decode_kwargs.get("output", "pil") == "pil":
            return [im for batch in out for im in batch]
        return out[0] if len(out) == 1 else out

    # ------------------------------------------------------------------ previews
    @torch.no_grad()
    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Fast 8× preview of latents through the Previewer (needs ``previewer.safetensors``)."""
        if self._previewer is None:
            if self.source is None:
                raise W.WeightsError("no weight source to load previewer.safetensors from")
            self._previewer = load_previewer(self.source, self.device)
        out = self._previewer(self.check_latents(latents).to(self.device)).float()
        return to_pil(check_finite(out, "the Previewer").clamp(0, 1).cpu())

    def info(self) -> dict[str, Any]:
        """Which files and precisions are in use."""
        source = None if self.source is None else self.source.source + (" (built-in)" if self.source.builtin else "")
        return {"source": source, "device": str(self.device), "stage_b_dtype": str(self.dtype).replace("torch.", ""),
                "precision": self.dtype_reason, "components": {k: vars(v) for k, v in self.components.items()}}
