"""Training the codec itself from images, from scratch: Stage A (``stage-a``), the encoder alone on a thumbnail code
(``encoder``) and Stage B with the encoder (``codec``); then ``decoder`` and ``end-to-end`` fine-tune a trained
codec on its reconstructions. The official release has no Stage A training and trains Stage B against a frozen,
ImageNet-pretrained EfficientNetV2-S; with no such weights offline, the encoder is trained here: first alone to
carry a thumbnail of the image (``encoder``), then frozen (``codec.train_encoder: false``) or jointly with Stage B.

Data: ``data.images`` (a folder, manifest or tar shards), each image short side → ``data.image_size`` and centre
crop; every step takes a random ``crop``² window of each image and flips it half of the time, drawn from the
per-sample generators of :mod:`.rng` (so a resumed run sees the same crops). ``decoder`` and ``end-to-end`` also
train on several sizes: ``crops`` (one side drawn per batch) and ``max_zoom`` (a window covering more of the
image, resized down to its side).

``stage-a`` (not epsilon-prediction; the loop calls :meth:`StageATask.loss`): per sample
``l1·|x̂−x| + ssim·(1−SSIM(x̂,x))``, x̂ decoded from the continuous latent — the latent Stage B generates
and the codec decodes (unquantised). ``quantize: true`` trains through the vector quantiser instead (straight-through, plus
``vq·(codebook + 0.25·commitment)``), as a VQGAN is; on the mini codec's small data it collapsed to a few codes
within 500 updates, so the mini Stage A is trained without it (its codebook stays as initialised). No perceptual
(LPIPS) or adversarial term: LPIPS needs ImageNet VGG/AlexNet weights, which cannot be had offline here — the
documented, simpler recipe.

``codec``: x0 = the frozen Stage A's latent of the crop; the encoder sees the crop nearest-resized to
``encoder_fraction`` of its side (as :meth:`codec.Codec.encode` does), its latent conditions Stage B, dropped
(zeros) for ``1 − encoder_keep`` of the samples so that classifier-free guidance works; the text condition is the
constant vector written as ``clip_pooled_empty.safetensors`` (zeros); pyramid noise as the official Stage B.
``t_range: [1, 1]`` (a top-level key) trains Stage B only at pure noise: the one step the mini codec's sampler runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from .. import weights as W
from ..codec import Codec, encoder_input_size
from ..effnet import EfficientNetEncoder
from ..presets import create_model, list_presets
from ..stage_a import StageA
from ..stage_b import StageB
from .config import ConfigError, Section
from .objectives import pyramid_noise_per_sample
from .preview import save_collage
from .rng import BatchRandom
from .task import Task, load_trainable_model, model_config, read_state


def random_crops(images: torch.Tensor, side: int, rand: BatchRandom, max_zoom: float = 1.0) -> torch.Tensor:
    """A random ``side``² window of each image ``(B,3,H,W)``, flipped left-right with probability 1/2; positions
    and flips from each sample's own generator.

    ``max_zoom`` > 1: each window covers a random square of up to ``max_zoom``·``side`` pixels of the image (no more
    than the image holds; the zoom log-uniform), resized to ``side``² (antialiased bicubic), so that a window of
    a fixed side shows the image at several scales — as much of a photograph as a whole photo downsized to that
    side holds."""
    out = []
    h, w = images.shape[-2:]
    if side > min(h, w):
        raise ConfigError(f"crop {side} is larger than the training images ({h}×{w}); raise data.image_size")
    zoom_limit = min(max_zoom, min(h, w) / side)
    for x, g in zip(images, rand.samples):
        span = side
        if max_zoom > 1:
            span = min(round(side * zoom_limit ** float(torch.rand(1, generator=g))), min(h, w))
        top = int(torch.randint(0, h - span + 1, (1,), generator=g))
        left = int(torch.randint(0, w - span + 1, (1,), generator=g))
        x = x[:, top:top + span, left:left + span]
        if span != side:
            x = F.interpolate(x[None].float(), size=(side, side), mode="bicubic", antialias=True,
                              align_corners=False)[0].clamp(0, 1).to(x.dtype)
        out.append(x.flip(-1) if float(torch.rand(1, generator=g)) < 0.5 else x)
    return torch.stack(out).float()


class _ImageTask(Task):
    """Shared by the codec tasks: images from ``data.images``, BatchNorm statistics saved with the weights."""

    save_buffers = True
    trains_from = "images"
    store_fields = ()
    required_fields = ()

    def import_(self, path: Path) -> dict[str, torch.Tensor]:
        return read_state(path)

    def check_encoder_preset(self) -> None:
        """Refuse a section's ``encoder_preset`` that names no encoder architecture (the encoder and codec tasks)."""
        preset = self.options.encoder_preset
        if preset not in list_presets("effnet"):
            raise ConfigError(f"{self.source}: {self.section}.encoder_preset {preset!r} is not one of "
                              f"{list_presets('effnet')}.")

    def images(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's whole images on the training device (cropped there: on a GPU the crops cost nothing, and only
        the pinned batch is copied)."""
        return batch["images"].to(self.d.device, non_blocking=True)


class StageASection(Section):
    """``stage_a:`` section: crop side and loss weights."""

    crop: int = Field(128, ge=16, multiple_of=8, description="training window side in pixels")
    l1: float = Field(1.0, ge=0)
    ssim: float = Field(0.2, ge=0, description="weight of 1 − SSIM (torchmetrics, Gaussian 11×11)")
    quantize: bool = Field(False, description="train through the vector quantiser (VQGAN); off: a continuous "
                                              "autoencoder, as Stage B's latents are decoded unquantised")
    vq: float = Field(1.0, ge=0, description="weight of the codebook + 0.25·commitment loss (with quantize)")


class StageATask(_ImageTask):
    """Stage A (VQGAN-style autoencoder) from scratch on images."""

    name = "stage-a"
    section = "stage_a"
    section_model = StageASection
    diffusion = False

    def build(self, dataset: Any) -> nn.Module:

        self.dataset_ref = dataset
        model = load_trainable_model("stage_a", self.cfg, self.source)
        self.model_config = model_config(model)
        return model

    def inputs(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError("stage-a is trained through loss()")

    def loss(self, module: nn.Module, batch: dict[str, Any], rand: BatchRandom) -> torch.Tensor:
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        o = self.options
        x = random_crops(self.images(batch), o.crop, rand)
        rec, vq = module(x, quantize=o.quantize)
        rec = rec.float()
        per_sample = o.l1 * (rec - x).abs().mean(dim=(1, 2, 3))
        if o.quantize:
            per_sample = per_sample + o.vq * vq.float()
        if o.ssim:
            per_sample = per_sample + o.ssim * (1 - ssim(rec, x, data_range=1.0, reduction="none"))
        return per_sample

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        W.save_state(state, path, config=self.model_config, note="Stage A trained from scratch with cascade-codec")

    @torch.no_grad()
    def preview(self, module: nn.Module, step: int, path: Path) -> Path | None:
        x = self.preview_batch()["images"].float().to(self.d.device)
        return save_collage([x, module(x, quantize=self.options.quantize)[0].clamp(0, 1)], path)


class EncoderSection(Section):
    """``encoder:`` section: the encoder architecture and the thumbnail code it learns to output."""

    encoder_preset: str = Field("efficientnet_mini",
                                description="encoder architecture (a codec.presets name of family effnet)")
    crop: int = Field(256, ge=32, multiple_of=32, description="training window side in pixels (the native size)")
    encoder_fraction: float = Field(0.75, gt=0, le=1, description="encoder input side / crop side (official 0.75)")
    luma: int = Field(3, ge=1, description="luma samples per latent pixel side (luma² channels)")
    chroma: int = Field(1, ge=0,
                        description="samples of each chroma plane per latent pixel side (2·chroma² channels)")


# ITU-R BT.601 RGB → Y, Cb, Cr (as JPEG)
_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def thumbnail_code(images: torch.Tensor, size: tuple[int, int], luma: int = 3, chroma: int = 1) -> torch.Tensor:
    """A thumbnail of ``images`` ``(B,3,H,W)`` laid out on a latent grid ``size`` = (h, w): luma at ``luma``× and
    each chroma plane at ``chroma``× the grid (antialiased bicubic), each sample moved into channels
    (pixel-unshuffle): ``(B, luma² + 2·chroma², h, w)``. With luma 3 and chroma 1 on the mini codec's 6×6 grid
    (256² images) it is an 18×18 luma and 6×6 chroma thumbnail, which on photographs is nearer the image than the
    14×14 RGB thumbnail holding as many values as the 16×6×6 latent."""
    h, w = size
    with torch.autocast(images.device.type, enabled=False):  # float32 (antialiased bicubic has no bf16 kernel)
        ycc = torch.einsum("ij,bjhw->bihw", _YCBCR.to(images.device), images.float())
        parts = [F.pixel_unshuffle(F.interpolate(ycc[:, :1], size=(h * luma, w * luma), mode="bicubic",
                                                 antialias=True), luma)]
        if chroma:
            parts.append(F.pixel_unshuffle(F.interpolate(ycc[:, 1:], size=(h * chroma, w * chroma), mode="bicubic",
                                                         antialias=True), chroma))
        return torch.cat(parts, dim=1)


class EncoderTask(_ImageTask):
    """The encoder alone, from scratch, on a deterministic target: its latent learns to carry a thumbnail of the
    image (:func:`thumbnail_code`) in its first channels (the others are left free for a later joint step).

    The encoder sees the crop nearest-resized to ``encoder_fraction`` of its side (as :meth:`codec.Codec.encode`);
    its last layer is a BatchNorm without affine parameters, so the target is standardised per channel over the
    batch the same way, and the loss is the mean squared error per sample. Fast (no Stage A or Stage B), and it
    gives the codec step an encoder whose latent a Stage B can decode from its first update; an encoder trained
    from scratch through Stage B's loss carried little more than a 6×6 colour thumbnail."""

    name = "encoder"
    section = "encoder"
    section_model = EncoderSection
    diffusion = False

    def build(self, dataset: Any) -> nn.Module:
        o = self.options
        self.check_encoder_preset()
        torch.manual_seed(self.cfg.seed)
        model = create_model(o.encoder_preset)
        channels = o.luma ** 2 + 2 * o.chroma ** 2
        if channels > model.config["c_latent"]:
            raise ConfigError(f"{self.source}: encoder.luma {o.luma} and chroma {o.chroma} need {channels} latent "
                              f"channels; the encoder has {model.config['c_latent']}.")
        self.model_config = dict(model.config)
        self.dataset_ref = dataset
        return model.train().requires_grad_(True)

    def inputs(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError("encoder is trained through loss()")

    def loss(self, module: nn.Module, batch: dict[str, Any], rand: BatchRandom) -> torch.Tensor:
        o = self.options
        x = random_crops(self.images(batch), o.crop, rand)
        latent = module.encode(F.interpolate(x, size=encoder_input_size(*x.shape[-2:], o.encoder_fraction),
                                             mode="nearest")).float()
        target = thumbnail_code(x, tuple(latent.shape[-2:]), o.luma, o.chroma)
        mean, std = target.mean(dim=(0, 2, 3), keepdim=True), target.std(dim=(0, 2, 3), keepdim=True)
        target = (target - mean) / (std + 1e-5)
        return (latent[:, :target.shape[1]] - target).square().mean(dim=(1, 2, 3))

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        W.save_state(state, path, config=self.model_config,
                     note="encoder trained from scratch on a thumbnail code with cascade-codec")


class CodecSection(Section):
    """``codec:`` section: the frozen Stage A, the encoder architecture and the Stage B recipe."""

    stage_a: str = Field(description="trained Stage A file (safetensors with its config), kept frozen")
    encoder_preset: str = Field("efficientnet_mini",
                                description="encoder architecture (a codec.presets name of family effnet)")
    crop: int = Field(256, ge=32, multiple_of=32, description="training window side in pixels (the native size)")
    encoder_fraction: float = Field(0.75, gt=0, le=1, description="encoder input side / crop side (official 0.75)")
    encoder_keep: float = Field(0.9, ge=0, le=1, description="share of samples whose encoder latent is kept")
    pyramid_noise: bool = True
    encoder: Optional[str] = Field(None, description="encoder file to start from (e.g. what `cascade train encoder` "
                                                     "exported); none: a new one of encoder_preset")
    train_encoder: bool = Field(True, description="false: the encoder stays as loaded (BatchNorm statistics too) and "
                                                  "only Stage B learns to decode its latents")


def freeze_batchnorm_statistics(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode: it normalises with its saved statistics and keeps them."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class JointCodec(nn.Module):
    """The encoder and Stage B as one trained module: ``forward(x_t, r, images, keep, clip)`` predicts epsilon
    with Stage B conditioned on the encoder's latent of ``images`` (times ``keep``, 0 or 1 per sample). With
    ``frozen_encoder`` the encoder neither learns nor updates its BatchNorm statistics."""

    def __init__(self, effnet: EfficientNetEncoder, stage_b: StageB, frozen_encoder: bool = False):
        super().__init__()
        self.effnet, self.stage_b, self.frozen_encoder = effnet, stage_b, frozen_encoder
        if frozen_encoder:
            effnet.requires_grad_(False)

    def train(self, mode: bool = True) -> "JointCodec":
        """Train mode, except a frozen encoder's BatchNorm (see the class docstring)."""
        super().train(mode)
        if self.frozen_encoder:
            freeze_batchnorm_statistics(self.effnet)
        return self

    def forward(self, x: torch.Tensor, r: torch.Tensor, images: torch.Tensor, keep: torch.Tensor,
                clip: torch.Tensor) -> torch.Tensor:
        """Epsilon prediction (see the class docstring)."""
        effnet = self.effnet.encode(images) * keep.view(-1, 1, 1, 1).to(images)
        return self.stage_b(x, r, effnet, clip)


class CodecTask(_ImageTask):
    """The encoder and Stage B, jointly from scratch, on the latents of a frozen Stage A."""

    name = "codec"
    section = "codec"
    section_model = CodecSection

    def build(self, dataset: Any) -> nn.Module:
        o = self.options
        self.check_encoder_preset()
        if not Path(o.stage_a).is_file():
            raise ConfigError(f"{self.source}: codec.stage_a {o.stage_a} does not exist; train Stage A first "
                              "(`cascade train stage-a ...`) and export it.")
        self.stage_a, _ = W.load_configured(StageA, o.stage_a, None, torch.float32, self.d.device)
        self.stage_a.eval().requires_grad_(False)
        torch.manual_seed(self.cfg.seed)
        if o.encoder is not None:
            if not Path(o.encoder).is_file():
                raise ConfigError(f"{self.source}: codec.encoder {o.encoder} does not exist; train the encoder first "
                                  "(`cascade train encoder ...`) or leave codec.encoder out to start a new one.")
            effnet, _ = W.load_configured(EfficientNetEncoder, o.encoder, None, torch.float32, "cpu")
        else:
            effnet = create_model(o.encoder_preset)
        stage_b = load_trainable_model("stage_b", self.cfg, self.source)
        self.configs = {"effnet": dict(effnet.config), "stage_b": model_config(stage_b)}
        self.dataset_ref = dataset
        # a frozen encoder is not among the trained tensors: exports add it, so that the file holds the whole codec
        self.frozen = {} if o.train_encoder else {f"effnet.{k}": v.clone() for k, v in effnet.state_dict().items()}
        return JointCodec(effnet.requires_grad_(True), stage_b.requires_grad_(True), not o.train_encoder).train()

    def _conditions(self, images: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        o = self.options
        with torch.no_grad():
            x0 = self.stage_a.encode(images)
        small = F.interpolate(images, size=encoder_input_size(*images.shape[-2:], o.encoder_fraction), mode="nearest")
        clip = torch.zeros(images.shape[0], 1, self.configs["stage_b"]["c_clip"], device=images.device)
        return x0, {"images": small, "keep": keep.float().to(images.device), "clip": clip}

    def inputs(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        images = random_crops(self.images(batch), self.options.crop, rand)
        return self._conditions(images, rand.uniform() < self.options.encoder_keep)

    def noise(self, x0: torch.Tensor, rand: BatchRandom) -> torch.Tensor:
        return pyramid_noise_per_sample(x0, rand) if self.options.pyramid_noise else super().noise(x0, rand)

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        W.save_state({**self.frozen, **state}, path, config=self.configs,
                     note="encoder + Stage B trained with cascade-codec (effnet.*, stage_b.*)")

    @torch.no_grad()
    def preview(self, module: nn.Module, step: int, path: Path) -> Path | None:
        from ..diffusion import sample

        images = self.preview_batch()["images"].float().to(self.d.device)
        images = images[..., :self.options.crop, :self.options.crop]
        x0, cond = self._conditions(images, torch.ones(len(images), dtype=torch.bool))
        eff = module.effnet.encode(cond["images"])
        z = sample(module.stage_b, {"effnet": eff, "clip": cond["clip"]}, shape=tuple(x0.shape),
                   uncond={"effnet": torch.zeros_like(eff), "clip": cond["clip"]}, steps=10, cfg=1.1,
                   generator=torch.Generator().manual_seed(self.cfg.seed), device=self.d.device,
                   prediction=self.cfg.prediction)
        return save_collage([images, self.stage_a.decode(x0).clamp(0, 1), self.stage_a.decode(z).clamp(0, 1)], path)


def split_codec_state(path: str | Path) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """A ``codec`` or ``end-to-end`` task's weights file → ``{"effnet": (state, config), "stage_b": (state,
    config)}`` (and ``"stage_a"`` from ``end-to-end``) under each model's own (official) key names."""
    import json

    header = W.read_header(path)
    configs = json.loads(header.metadata[W.META_CONFIG])
    state = dict(W.iter_tensors(header, torch.float32))
    return {part: ({k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}, config)
            for part, config in configs.items()}


class DecoderSection(Section):
    """``decoder:`` section: the trained codec whose output Stage A's decoder learns to decode, and the loss."""

    codec: str = Field(description="folder of the trained codec in the official layout (effnet_encoder.safetensors, "
                                   "the Stage B file; e.g. what `export_mini.py codec` wrote), kept frozen")
    crop: int = Field(256, ge=32, multiple_of=32, description="training window side in pixels (the native size)")
    encoder_fraction: float = Field(0.75, gt=0, le=1, description="encoder input side / crop side (official 0.75)")
    crops: list[int] = Field([], description="multi-scale training: window sides (multiples of 32), one drawn per "
                                             "batch, instead of `crop` alone; Stage B then sees the token counts of "
                                             "larger images, whose attention otherwise meets more tokens than it "
                                             "was trained on")
    max_zoom: float = Field(1.0, ge=1.0, description="each window covers up to this many times its side of the "
                                                     "image, resized down (antialiased): photos at the scales a "
                                                     "whole photo has when downsized to the window (1: no zoom)")
    decode_crop: int = Field(128, ge=16, multiple_of=16,
                             description="side in pixels of the random window of Stage B's output that is decoded "
                                         "and compared (Stage A is convolutional; smaller is faster); the crop side "
                                         "decodes it all")
    l1: float = Field(1.0, ge=0)
    mse: float = Field(0.0, ge=0, description="weight of the mean squared error (what PSNR measures)")
    ssim: float = Field(0.2, ge=0, description="weight of 1 − SSIM (torchmetrics, Gaussian 11×11)")

    @field_validator("crops")
    @classmethod
    def _sides(cls, v: list[int]) -> list[int]:
        bad = [c for c in v if c < 32 or c % 32]
        if bad:
            raise ValueError(f"crops {bad}: each window side must be a multiple of 32, at least 32")
        return v


def codec_latents(codec: Codec, effnet: EfficientNetEncoder, stage_b: StageB, images: torch.Tensor,
                  encoder_fraction: float, rand: BatchRandom | None = None) -> torch.Tensor:
    """What ``effnet`` + ``stage_b`` give for ``images`` when sampled as :meth:`codec.Codec.decode` samples
    ``codec``'s (its file's sampler defaults; the start noise from each sample's generator, or seeds 0, 1, …):
    Stage A latents. Differentiable in the two models' parameters (callers add ``no_grad`` when frozen)."""
    from ..diffusion import sample

    size = encoder_input_size(*images.shape[-2:], encoder_fraction)
    eff = effnet.encode(F.interpolate(images, size=size, mode="nearest"))
    d = codec.sampler_defaults
    clip = codec.pooled_text(None, images.shape[0]).to(images.device)
    shape = (1, stage_b.config.c_in, images.shape[-2] // 4, images.shape[-1] // 4)
    gens = rand.samples if rand is not None else [torch.Generator().manual_seed(i) for i in range(len(images))]
    noise = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(images.device)
    uncond = {"effnet": torch.zeros_like(eff), "clip": clip}  # unused at cfg None or 1 (see sample)
    return sample(stage_b, {"effnet": eff, "clip": clip}, x_init=noise, uncond=uncond, steps=d["steps"],
                  cfg=d["cfg"], sampler=d["sampler"], x0_clamp=d["x0_clamp"], prediction=d["prediction"],
                  generator=gens[0], device=images.device, grad=torch.is_grad_enabled())


class DecoderTask(_ImageTask):
    """Stage A's decoder fine-tuned on what a trained codec's Stage B generates, not on Stage A's own exact latents.

    An autoencoder trained on its exact latents decodes them well, but Stage B's samples — at one step, its
    regression of the latent on the encoder's — lie off that set, and the decoder is free to turn them into
    anything. Here the encoder and Stage B are frozen and sampled as :meth:`codec.Codec.decode` does (their file's
    sampler defaults), and only Stage A's decoder (``up_blocks``, ``out_block``) learns to map that output to the
    image: ``l1·|x̂−x| + ssim·(1−SSIM(x̂,x))`` per sample. ``model.checkpoint`` is the Stage A to start from."""

    name = "decoder"
    section = "decoder"
    section_model = DecoderSection
    diffusion = False
    DECODER = ("up_blocks.", "out_block.")

    def build(self, dataset: Any) -> nn.Module:
        o = self.options
        if self.d.world_size > 1:
            raise ConfigError(f"{self.source}: the decoder task runs in one process (it calls Stage A's decode "
                              "directly); start it without torchrun.")
        if not Path(o.codec).is_dir():
            raise ConfigError(f"{self.source}: decoder.codec {o.codec} is not a folder; export the trained codec "
                              "first (`python scripts/export_mini.py codec ...`).")
        self.codec = Codec.from_pretrained(o.codec, device=self.d.device, dtype=torch.float32)
        model = load_trainable_model("stage_a", self.cfg, self.source)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(self.DECODER))
        self.frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(self.DECODER)}
        self.model_config = model_config(model)
        self.dataset_ref = dataset
        return model

    def inputs(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError("decoder is trained through loss()")

    @torch.no_grad()
    def generated(self, images: torch.Tensor, rand: BatchRandom | None = None) -> torch.Tensor:
        """Stage B's latents for ``images`` as the codec decodes them (start noise from each sample's generator)."""
        return codec_latents(self.codec, self.codec.effnet, self.codec.stage_b, images, self.options.encoder_fraction,
                             rand)

    def decoder(self, module: nn.Module) -> StageA:
        """The Stage A whose decoder is trained (the module itself here)."""
        return module

    def loss(self, module: nn.Module, batch: dict[str, Any], rand: BatchRandom) -> torch.Tensor:
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        o = self.options
        crop = o.crops[min(int(rand.batch_uniform() * len(o.crops)), len(o.crops) - 1)] if o.crops else o.crop
        x = random_crops(self.images(batch), crop, rand, o.max_zoom)
        z = self.latents(module, x, rand)
        side = min(o.decode_crop, crop) // 4  # in latent pixels (Stage A: 4 px each)
        zs, xs = [], []
        for zi, xi, g in zip(z, x, rand.samples):
            top, left = (int(torch.randint(0, zi.shape[-2] - side + 1, (1,), generator=g)),
                         int(torch.randint(0, zi.shape[-1] - side + 1, (1,), generator=g)))
            zs.append(zi[:, top:top + side, left:left + side])
            xs.append(xi[:, 4 * top:4 * (top + side), 4 * left:4 * (left + side)])
        x = torch.stack(xs)
        rec = self.decoder(module).decode(torch.stack(zs)).float()
        per_sample = o.l1 * (rec - x).abs().mean(dim=(1, 2, 3)) + o.mse * (rec - x).square().mean(dim=(1, 2, 3))
        if o.ssim:
            per_sample = per_sample + o.ssim * (1 - ssim(rec, x, data_range=1.0, reduction="none"))
        return per_sample

    def latents(self, module: nn.Module, images: torch.Tensor, rand: BatchRandom | None) -> torch.Tensor:
        """Stage B's latents for ``images`` during training and previews (the frozen codec's here)."""
        return self.generated(images, rand)

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        W.save_state({**self.frozen, **state}, path, config=self.model_config,
                     note="Stage A with its decoder fine-tuned on a trained codec's Stage B output (cascade-codec)")

    @torch.no_grad()
    def preview(self, module: nn.Module, step: int, path: Path) -> Path | None:
        x = self.preview_batch()["images"].float().to(self.d.device)
        x = x[..., :self.options.crop, :self.options.crop]
        return save_collage([x, self.decoder(module).decode(self.latents(module, x, None)).clamp(0, 1)], path)


class EndToEndSection(DecoderSection):
    """``end_to_end:`` section: the decoder task's options, plus which of the codec's parts train."""

    codec: str = Field(description="folder of the codec to fine-tune, in the official layout (stage_a.safetensors, "
                                   "effnet_encoder.safetensors, the Stage B file; e.g. codec/mini or what "
                                   "`export_mini.py codec` wrote)")
    train: list[Literal["encoder", "stage_b", "decoder"]] = Field(
        ["encoder", "stage_b", "decoder"], min_length=1,
        description="parts that learn: the encoder, Stage B, Stage A's decoder (Stage A's encoder never does)")


class CodecPath(nn.Module):
    """The encoder, Stage B and Stage A of a codec as one module, for training them through the path
    :meth:`codec.Codec.reconstruct` runs (image → latent → Stage B sample → Stage A decode)."""

    def __init__(self, effnet: EfficientNetEncoder, stage_b: StageB, stage_a: StageA):
        super().__init__()
        self.effnet, self.stage_b, self.stage_a = effnet, stage_b, stage_a

    def train(self, mode: bool = True) -> "CodecPath":
        """Train mode with the BatchNorm statistics frozen: the encoder then normalises its latent during
        fine-tuning exactly as it will when it encodes."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class EndToEndTask(DecoderTask):
    """A trained codec fine-tuned end to end on what it is judged by: the reconstruction of the image.

    The image goes through the encoder, Stage B (sampled as :meth:`codec.Codec.decode` samples it, with its file's
    sampler defaults — for the built-in codec one deterministic step) and Stage A's decoder, and the
    ``l1·|x̂−x| + mse·(x̂−x)² + ssim·(1−SSIM(x̂,x))`` of a random ``decode_crop``² window trains the parts in
    ``train``. The diffusion (``codec``) and ``decoder`` tasks each see one part's error; this one sees the
    pixels'. The output file holds all three models (``effnet.*``, ``stage_b.*``, ``stage_a.*``); `python
    scripts/export_mini.py end-to-end RUN FOLDER` writes the codec folder."""

    name = "end-to-end"
    section = "end_to_end"
    section_model = EndToEndSection
    PARTS = {"encoder": ("effnet.",), "stage_b": ("stage_b.",),
             "decoder": tuple(f"stage_a.{p}" for p in DecoderTask.DECODER)}

    def build(self, dataset: Any) -> nn.Module:
        o = self.options
        if self.d.world_size > 1:
            raise ConfigError(f"{self.source}: the end-to-end task runs in one process; start it without torchrun.")
        if not Path(o.codec).is_dir():
            raise ConfigError(f"{self.source}: end_to_end.codec {o.codec} is not a folder; give a codec folder in "
                              "the official layout (e.g. codec/mini).")
        self.codec = Codec.from_pretrained(o.codec, device=self.d.device, dtype=torch.float32)
        model = CodecPath(self.codec.effnet, self.codec.stage_b, self.codec.stage_a)
        prefixes = tuple(p for part in o.train for p in self.PARTS[part])
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(prefixes))
        self.frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(prefixes)}
        self.configs = {"effnet": dict(model.effnet.config), "stage_b": model_config(model.stage_b),
                        "stage_a": model_config(model.stage_a)}
        self.dataset_ref = dataset
        return model.train()

    def latents(self, module: nn.Module, images: torch.Tensor, rand: BatchRandom | None) -> torch.Tensor:
        return codec_latents(self.codec, module.effnet, module.stage_b, images, self.options.encoder_fraction, rand)

    def decoder(self, module: nn.Module) -> StageA:
        return module.stage_a

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        W.save_state({**self.frozen, **state}, path, config=self.configs,
                     note="a codec fine-tuned end to end with cascade-codec (effnet.*, stage_b.*, stage_a.*)")
