"""Text-to-image, image variation and image-to-image: text → Stage C → Stage B → Stage A.

Defaults are the official notebook settings: Stage C 20 DDPM steps, shift 2, CFG 4
(rescale 0.7); Stage B 10 steps, shift 1, CFG 1.1. The unconditional text is the CLIP
encoding of the negative prompt (``""`` by default, as official); the unconditional
image condition is zeros. One CPU generator, seeded once, draws the Stage C noise and
then continues into Stage B, which is the official RNG order under
``torch.manual_seed(seed)``.

Models are staged so that no more than one large network is resident at a time:
text encoder → (image encoder / EfficientNet) → Stage C → Stage B + Stage A, each
released before the next is loaded (``keep_loaded=True`` keeps them for repeated calls).
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .. import weights as W
from ..codec import Codec, encode_pixels, load_component, load_controlnet, load_encoder, load_previewer
from ..devices import resolve_device
from ..diffusion import diffuse, sample
from ..errors import MissingInputError, UsageError, check_finite
from ..images import ImageLike, to_pil, to_tensor_list
from ..layouts import locate as layouts
from ..layouts import official
from ..presets import get_preset
from ..stage_c import StageC, StageCConfig
from ..text import missing_text_folders

COMPRESSION_C = 42.67  # output pixels per Stage C latent pixel (official calculate_latent_sizes)
MODES = ("text", "variation", "img2img")

PreviewCallback = Callable[[int, int, list[Image.Image]], None]


def stage_c_latent_size(height: int, width: int) -> tuple[int, int]:
    """Stage C latent size for an output size: ``ceil(side / 42.67)`` (1024 → 24, 1000 → 24, 1536 → 36)."""
    return math.ceil(height / COMPRESSION_C), math.ceil(width / COMPRESSION_C)


def check_size(height: int, width: int) -> None:
    """Refuse output sizes outside 256–4096 px per side."""
    for side in (height, width):
        if not 256 <= side <= 4096:
            raise UsageError(f"image size {width}×{height} (W×H) is outside 256–4096 px per side")


@dataclass
class GenerationSettings:
    """Every knob of one generation call (recorded with the result)."""

    height: int = 1024
    width: int = 1024
    steps_c: int = 20
    cfg_c: float = 4.0
    shift_c: float = 2.0
    steps_b: int = 10
    cfg_b: float = 1.1
    shift_b: float = 1.0
    cfg_rho: float = 0.7
    sampler: str = "ddpm"
    seed: int | None = 0
    mode: str = "text"
    strength: float = 0.8


@dataclass
class GenerationResult:
    """Images, the Stage C latents they were decoded from, and the settings used."""

    images: list[Image.Image] | torch.Tensor
    latents: torch.Tensor
    prompts: list[str]
    settings: GenerationSettings
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PriorOutput:
    """What the prior step hands to the decoder step: Stage C latents ``(N,16,h,w)`` (fp32, CPU), the pooled text
    condition for Stage B, one prompt per latent, the settings so far and the generator to go on drawing from."""

    latents: torch.Tensor
    clip_text_pooled: torch.Tensor
    prompts: list[str]
    settings: GenerationSettings
    generator: torch.Generator | None


def _release(*_: object) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TextToImage:
    """Stable Cascade generation on top of the codec: ``TextToImage.from_pretrained(...).generate("a cat")``."""

    def __init__(self, source: W.WeightSource, stage_c: str = "lite", stage_b: str = "lite",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 clip_source: str | os.PathLike | None = None, keep_loaded: bool = False,
                 loras: Sequence[tuple[str | os.PathLike, float]] = (), dtype_reason: str | None = None):
        self.source = source
        self.stage_c_size = stage_c
        self.stage_b_size = stage_b
        self.device = torch.device(device)
        self.dtype = dtype
        self.dtype_reason = dtype_reason or f"{str(dtype).replace('torch.', '')}: given to TextToImage()"
        self.clip_source: str | os.PathLike | W.WeightSource = clip_source if clip_source is not None else source
        self.keep_loaded = keep_loaded
        self.loras = [(Path(p), float(m)) for p, m in loras]
        for path, _ in self.loras:
            if not path.is_file():
                raise MissingInputError(f"LoRA file {path} does not exist")
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = W.OFFICIAL_REPO, stage_c: str | None = None,
                        stage_b: str | None = None, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, clip_source: str | os.PathLike | None = None,
                        keep_loaded: bool = False,
                        loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> "TextToImage":
        """Check that the weights are there and return a pipeline that loads them on use.

        ``source``: a folder or repo id in the official layout (``stage_c*.safetensors``, …)
        or the diffusers layout (``prior[_lite]/``, ``decoder[_lite]/``, ``vqgan/`` folders;
        the hub keeps the prior in ``stable-cascade-prior``, so put both repos' folders in
        one folder), or ComfyUI's ``stable_cascade_stage_c[_lite].safetensors`` (Stage C, text
        and image encoders, EfficientNet, Previewer) given as the file or its folder, with
        ``stable_cascade_stage_b[_lite].safetensors`` beside it for Stage B and Stage A and the
        Hugging Face ``tokenizer/`` folder (ComfyUI's files hold no tokenizer). img2img needs the
        EfficientNet encoder: the official ``effnet_encoder.safetensors`` or ComfyUI's Stage C file.

        ``stage_c``/``stage_b``: ``"lite"`` or ``"large"``; default lite, or the size in the
        ComfyUI file given as ``source``. ``dtype``: Stage C and Stage B
        precision (``"auto"``/``None``: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere, as
        :func:`codec.devices.auto_dtype` decides; :attr:`dtype_reason` says why); ``fp16`` runs Stage C in its
        overflow-safe fp16 mode (:meth:`StageC.half_safe`). ``clip_source``: folder or repo
        with ``text_encoder/``, ``tokenizer/`` (and ``image_encoder/`` for variations);
        default: ``source``. ``loras``: ``(file, strength)`` pairs merged into Stage C (official,
        kohya/ComfyUI or diffusers/PEFT naming); trained tokens in a file are added to the
        tokenizer and text encoder.
        """
        device = resolve_device(device)
        dtype, why = W.resolve_dtype(dtype, device)
        src = W.WeightSource(W.default_source(source))
        stage_c = stage_c or layouts.default_size(src, "stage_c")
        stage_b = stage_b or layouts.default_size(src, "stage_b")
        pipeline = cls(src, stage_c, stage_b, device, dtype, clip_source, keep_loaded, loras, dtype_reason=why)
        text = missing_text_folders(clip_source or src) if src.builtin is None else None
        fetch = None  # one message for everything missing, the text encoder included
        if text is not None and text[1]:
            root, missing = text
            fetch = (f"download the {' and '.join(d + '/' for d in missing)} folder(s) of {W.OFFICIAL_REPO} (2.8 GB) "
                     f"into {root}/ , e.g. `hf download {W.OFFICIAL_REPO} "
                     f"--include {' '.join(repr(d + '/*') for d in missing)} --local-dir {root}`.")
        try:
            layouts.require(src, pipeline._locations())
        except W.WeightsError as e:
            raise W.WeightsError(f"{e}\nThe text encoder is missing too: {fetch}" if fetch else str(e)) from None
        if fetch:
            raise W.WeightsError(f"{root} has no text encoder for the captions: {fetch}")
        return pipeline

    def _locations(self) -> list[official.Located]:
        """Where Stage C, Stage B and Stage A are, in either layout (official file names if absent)."""
        return [layouts.resolve(self.source, f"stage_c_{self.stage_c_size}", self.dtype,
                                self.source.stage_c_file(self.stage_c_size, self.dtype)),
                layouts.resolve(self.source, f"stage_b_{self.stage_b_size}", self.dtype,
                                self.source.stage_b_file(self.stage_b_size, self.dtype)),
                layouts.resolve(self.source, "stage_a", torch.float32, W.STAGE_A_FILE)]

    def notes(self) -> list[str]:
        """Notes stored in the weight files that will be used (e.g. that they are tiny random weights)."""
        notes = {layouts.open_component(self.source, loc)[0].metadata.get(W.META_NOTE) for loc in self._locations()}
        return sorted(n for n in notes if n)

    # ------------------------------------------------------------------ model staging
    def _get(self, name: str, load: Callable[[], Any]) -> Any:
        if name in self._cache:
            return self._cache[name]
        model = load()
        if self.keep_loaded:
            self._cache[name] = model
        return model

    def _text_encoder(self):
        from ..text import TextEncoder

        def load():
            from .lora import read_lora_tokens
            from .tokens import load_token_state

            encoder = TextEncoder.from_pretrained(self.clip_source, device=self.device, dtype=self.dtype)
            for path, _ in self.loras:
                state, info = read_lora_tokens(path)
                if state:
                    load_token_state(encoder, state, info.tokens, source=str(path))
                    encoder.pool_at = info.pool_at or encoder.pool_at
            return encoder

        return self._get("text", load)

    def _image_encoder(self):
        from .clip_image import ImageEncoder

        return self._get("image", lambda: ImageEncoder.from_pretrained(self.clip_source, device=self.device,
                                                                     dtype=self.dtype))

    def _stage_c(self) -> StageC:
        def load() -> StageC:
            # Plain fp16 overflows: fp16 means the overflow-safe mode, converted from bf16 (exact for the
            # fp32 parts; fp16 holds every bf16 weight the safe mode accepts).
            dtype = torch.bfloat16 if self.dtype == torch.float16 else self.dtype
            model, _ = load_component(self.source, self._locations()[0], StageC,
                                       get_preset(f"stage_c_{self.stage_c_size}").kwargs(), dtype, self.device)
            from .lora import read_lora

            for path, strength in self.loras:
                network, _, _ = read_lora(path, model)
                network.set_multiplier(strength)
                network.merge(model)
            return model.half_safe() if self.dtype == torch.float16 else model

        return self._get("stage_c", load)

    def _codec(self) -> Codec:
        return self._get("codec", lambda: Codec.from_pretrained(self.source.source, stage_b=self.stage_b_size,
                                                                dtype=self.dtype, device=self.device,
                                                                encoder=False))

    def _previewer(self):
        return self._get("previewer", lambda: load_previewer(self.source, self.device))

    # ------------------------------------------------------------------ conditions
    def _conditions(self, prompts: list[str], negative: list[str], images: torch.Tensor | None,
                    mode: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        text = self._text_encoder()
        cond_t, uncond_t = text.encode(prompts), text.encode(negative)
        del text
        _release()
        n = len(prompts)
        c_img = self._stage_c_config().c_clip_img
        clip_img = torch.zeros(n, 1, c_img, device=self.device)
        if mode == "variation":
            encoder = self._image_encoder()
            clip_img = encoder.encode(images).to(self.device)
            del encoder
            _release()
            if clip_img.shape[-1] != c_img:
                raise UsageError(f"the image encoder gives {clip_img.shape[-1]}-d embeddings but Stage C expects "
                                 f"{c_img}-d: use the CLIP ViT-L/14 image_encoder/ of {W.OFFICIAL_REPO}-prior")
        cond = {"clip_text": cond_t.hidden.to(self.device), "clip_text_pooled": cond_t.pooled.to(self.device),
                "clip_img": clip_img}
        uncond = {"clip_text": uncond_t.hidden.to(self.device), "clip_text_pooled": uncond_t.pooled.to(self.device),
                  "clip_img": torch.zeros_like(clip_img)}
        return cond, uncond

    def _stage_c_config(self) -> StageCConfig:
        """Stage C's hyper-parameters, from the loaded model or the file header (without loading it)."""
        if "stage_c" in self._cache:
            return self._cache["stage_c"].config
        _, config = layouts.open_component(self.source, self._locations()[0])
        preset = get_preset(f"stage_c_{self.stage_c_size}").kwargs()
        preset.update(config or {})
        return StageCConfig(**preset)

    def _img2img_latents(self, images: torch.Tensor, height: int, width: int) -> torch.Tensor:
        encoder = self._get("effnet", lambda: load_encoder(self.source, self.device))
        lh, lw = stage_c_latent_size(height, width)
        x = F.interpolate(images.float(), size=(lh * 32, lw * 32), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)
        latents = check_finite(encode_pixels(encoder, x), "the EfficientNet encoder")
        del encoder
        _release()
        return latents

    def _control_features(self, kind: str, image: ImageLike, strength: float, size: tuple[int, int],
                          mask: ImageLike | None, threshold: float, outpaint: bool) -> list[torch.Tensor | None]:
        """The ControlNet features for one control image (loaded, run and released here)."""

        from . import control_filters as CF
        from .control import control_features

        dtype = torch.bfloat16 if self.dtype == torch.float16 else self.dtype
        net = self._get(f"controlnet_{kind}",
                        lambda: load_controlnet(self.source.source, kind, dtype=dtype, device=self.device))
        saliency = CF.load_saliency(self.source) if kind == "inpainting" and mask is None else None
        effnet = load_encoder(self.source, self.device) if kind == "super_resolution" else None
        features = control_features(net, image, kind, strength, size=size, mask=mask, saliency=saliency,
                                    threshold=threshold, outpaint=outpaint, effnet=effnet)
        net = saliency = effnet = None
        _release()
        return features

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 height: int | None = None, width: int | None = None, num_images: int = 1, steps_c: int = 20,
                 cfg_c: float | None = 4.0, shift_c: float = 2.0, steps_b: int = 10, cfg_b: float | None = 1.1,
                 shift_b: float = 1.0, cfg_rho: float = 0.7, sampler: str = "ddpm", seed: int | None = 0,
                 image: ImageLike | None = None, mode: str | None = None, strength: float = 0.8,
                 batch_size: int = 4, preview: PreviewCallback | None = None,
                 progress: Callable[[str, int, int], None] | None = None, output: str = "pil",
                 controlnet: str | None = None, control_image: ImageLike | None = None,
                 control_strength: float = 1.0, control_mask: ImageLike | None = None,
                 control_threshold: float = 0.2, outpaint: bool = False) -> GenerationResult:
        """Generate ``num_images`` images per prompt: :meth:`prior` (Stage C) then :meth:`decode` (Stage B and A).

        ``mode``: ``"text"`` (default without ``image``), ``"variation"`` (condition on the
        CLIP image embedding of ``image``; default with ``image``) or ``"img2img"`` (start
        Stage C from ``image``'s EfficientNet latent noised to ``t = strength``, with the
        official semantics: noised with shift 1, sampled with ``shift_c``, running
        ``int(steps_c · strength)`` steps). Size: 1024² by default; with an image, its
        aspect ratio at a 1024 px short side. ``preview(step, total, images)`` receives
        Previewer decodes of Stage C's x0 after every step; ``progress(stage, step, total)``
        reports sampling progress. ``output``: ``"pil"`` or ``"tensor"``.

        ``controlnet``: ``"canny"``, ``"inpainting"`` or ``"super_resolution"`` (the official
        ``controlnet/<kind>.safetensors`` in the weights folder) guided by ``control_image``
        at ``control_strength``; inpainting fills the white part of ``control_mask`` (or,
        without a mask, the salient region found by ``controlnet/saliency_model.safetensors``
        with ``control_threshold``; ``outpaint`` fills the rest instead). Default size with a
        control image: its aspect at a 1024 px short side (super-resolution: twice its size).
        The same features go to the conditional and the unconditional pass, as official.
        """
        prior = self.prior(prompt, negative_prompt, height=height, width=width, num_images=num_images,
                           steps=steps_c, cfg=cfg_c, shift=shift_c, cfg_rho=cfg_rho, sampler=sampler, seed=seed,
                           image=image, mode=mode, strength=strength, batch_size=batch_size, preview=preview,
                           progress=progress, controlnet=controlnet, control_image=control_image,
                           control_strength=control_strength, control_mask=control_mask,
                           control_threshold=control_threshold, outpaint=outpaint)
        return self.decode(prior, steps=steps_b, cfg=cfg_b, shift=shift_b, cfg_rho=cfg_rho, sampler=sampler,
                           batch_size=batch_size, progress=progress, output=output)

    def _output_size(self, height: int | None, width: int | None, picture: torch.Tensor | None,
                     control_image: ImageLike | None, controlnet: str | None) -> tuple[int, int]:
        """The image size to generate: as given, else from the input or control image (1024 px short side;
        super-resolution: twice the control image), else 1024²."""
        if control_image is not None and picture is None and height is None and width is None:
            ch, cw = to_tensor_list(control_image)[0].shape[-2:]
            if controlnet == "super_resolution":
                height, width = 2 * ch, 2 * cw
            else:
                height, width = round(ch * 1024 / min(ch, cw)), round(cw * 1024 / min(ch, cw))
        if picture is not None and height is None and width is None:
            h, w = picture.shape[-2:]
            scale = 1024 / min(h, w)
            height, width = round(h * scale), round(w * scale)
        height, width = height or 1024, width or 1024
        check_size(height, width)
        return height, width

    @torch.no_grad()
    def prior(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
              height: int | None = None, width: int | None = None, num_images: int = 1, steps: int = 20,
              cfg: float | None = 4.0, shift: float = 2.0, cfg_rho: float = 0.7, sampler: str = "ddpm",
              seed: int | None = 0, image: ImageLike | None = None, mode: str | None = None, strength: float = 0.8,
              batch_size: int = 4, preview: PreviewCallback | None = None,
              progress: Callable[[str, int, int], None] | None = None, controlnet: str | None = None,
              control_image: ImageLike | None = None, control_strength: float = 1.0,
              control_mask: ImageLike | None = None, control_threshold: float = 0.2,
              outpaint: bool = False) -> PriorOutput:
        """The prior step: text (and image) conditions → Stage C latents, with what :meth:`decode` needs.

        Arguments as :meth:`generate`'s Stage C ones (``steps`` = ``steps_c`` …). The returned generator is the one
        Stage C drew from; :meth:`decode` goes on drawing from it, as the official pipeline does."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise UsageError("no prompt given")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise UsageError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        mode = mode or ("text" if image is None else "variation")
        if mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "text" and image is None:
            raise UsageError(f"mode {mode!r} needs an image")
        if not 0 < strength <= 1:
            raise UsageError(f"strength must be in (0, 1], got {strength}")
        if num_images < 1:
            raise UsageError(f"num_images must be at least 1, got {num_images}")
        if (controlnet is None) != (control_image is None):
            raise UsageError("controlnet and control_image go together: give both or neither")
        picture = to_tensor_list(image)[0][None] if image is not None else None
        height, width = self._output_size(height, width, picture, control_image, controlnet)
        settings = GenerationSettings(height, width, steps, cfg, shift, cfg_rho=cfg_rho, sampler=sampler, seed=seed,
                                      mode=mode, strength=strength)

        all_prompts = [p for p in prompts for _ in range(num_images)]
        all_negatives = [n for n in negatives for _ in range(num_images)]
        n = len(all_prompts)
        images_in = picture.expand(n, -1, -1, -1) if picture is not None else None
        cond, uncond = self._conditions(all_prompts, all_negatives, images_in, mode)
        x_init = None
        if mode == "img2img":
            x_init = self._img2img_latents(picture, height, width).to(self.device).expand(n, -1, -1, -1)

        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        lh, lw = stage_c_latent_size(height, width)
        features = None
        if controlnet is not None:
            features = self._control_features(controlnet, control_image, control_strength, (height, width),
                                              control_mask, control_threshold, outpaint)
            if controlnet == "super_resolution":  # the features fix the latent size
                lh, lw = next(f for f in features if f is not None).shape[-2:]
        stage_c = self._stage_c()
        previewer = self._previewer() if preview is not None else None
        latents = []
        for start in range(0, n, batch_size):
            sl = slice(start, min(n, start + batch_size))
            kwargs: dict[str, Any] = dict(steps=steps, t_start=1.0)
            if x_init is not None:
                # Official img2img: the image latent is noised with shift 1 whatever the sampling shift.
                noised = diffuse(x_init[sl], strength, shift=1.0, generator=generator)[0]
                kwargs = dict(steps=max(1, int(steps * strength)), t_start=strength, x_init=noised)
            total = kwargs["steps"]

            def on_step(i: int, x0: torch.Tensor, _x: torch.Tensor, total: int = total) -> None:
                if progress is not None:
                    progress("stage_c", i + 1, total)
                if previewer is not None:
                    preview(i + 1, total, to_pil(previewer(x0.to(self.device)).float().clamp(0, 1).cpu()))

            cond_b = {k: v[sl] for k, v in cond.items()}
            uncond_b = {k: v[sl] for k, v in uncond.items()}
            if features is not None:
                cnet = [None if f is None else f.expand(sl.stop - sl.start, -1, -1, -1) for f in features]
                cond_b["cnet"] = uncond_b["cnet"] = cnet
            z = sample(stage_c, cond_b, shape=(sl.stop - sl.start, stage_c.config.c_in, lh, lw),
                       uncond=uncond_b if cfg is not None else None,
                       cfg=cfg, cfg_rho=cfg_rho, shift=shift, sampler=sampler, generator=generator,
                       device=self.device, callback=on_step, **kwargs)
            latents.append(check_finite(z, "Stage C").float().cpu())
        stage_c = previewer = None
        _release()
        return PriorOutput(torch.cat(latents), cond["clip_text_pooled"], all_prompts, settings, generator)

    @torch.no_grad()
    def decode(self, prior: PriorOutput, *, steps: int = 10, cfg: float | None = 1.1, shift: float = 1.0,
               cfg_rho: float = 0.7, sampler: str | None = None, batch_size: int = 4,
               progress: Callable[[str, int, int], None] | None = None, output: str = "pil") -> GenerationResult:
        """The decoder step: Stage C latents of :meth:`prior` → images through Stage B (conditioned on the prompts'
        pooled text) and Stage A, at the prior's size, drawing noise from the prior's generator. ``sampler``
        defaults to the prior's."""
        s = prior.settings
        sampler = sampler or s.sampler
        settings = replace(s, steps_b=steps, cfg_b=cfg, shift_b=shift, cfg_rho=cfg_rho, sampler=sampler)
        codec = self._codec()
        images = codec.decode(prior.latents, height=s.height, width=s.width, steps=steps, cfg=cfg,
                              clip=prior.clip_text_pooled, sampler=sampler, cfg_rho=cfg_rho, shift=shift,
                              batch_size=batch_size, output=output, generator=prior.generator, seed=None,
                              progress=(lambda i, t: progress("stage_b", i, t)) if progress is not None else None)
        del codec
        _release()
        return GenerationResult(images=images, latents=prior.latents, prompts=prior.prompts, settings=settings)
