"""ControlNet training on a frozen Stage C (official ``train_c_controlnet.py`` recipe) from images.

The control (canny edges, an inpainting mask, a low-resolution latent) is computed from
pixels, which a latent store does not hold, so this task trains from an image source
(``data.images``: folder, manifest or tar shards; centre crop to ``data.image_size``) and
per batch computes, without gradients: the training filter of ``controlnet.kind``
(:class:`~codec.generation.control_filters.TrainingControl`), the Stage C latents with the
EfficientNet encoder, the text conditions with the text encoder and, for the official 10 %,
the CLIP image embedding. The loop is the generic one (random t, noise, P2 weights, AdamW,
clipping, EMA, checkpoints); what is ControlNet-specific, as officially:

* the trained module is :class:`ControlledStageC`: only the ControlNet trains — all of it,
  the EfficientNet backbone's weights included, but with that backbone's BatchNorm
  statistics frozen (eval mode); Stage C is frozen yet left in train mode, so its dropout
  is active (an official quirk; ``controlnet.stage_c_dropout: false`` switches it off);
* ``offset_noise`` defaults to the kind's official value (:data:`OFFSET_NOISE`: 0.1 for
  inpainting and super_resolution).

Checkpoints and the exported file hold the whole ControlNet (BatchNorm buffers included) in
the released layout with its config: it loads with ``codec.codec.load_controlnet(path)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ... import weights as W
from ...blocks import ResBlock
from ...codec import load_controlnet
from ...controlnet import ControlNet
from ...errors import UsageError
from ...presets import CONTROLNET_KINDS, get_preset
from ...stage_c import StageC
from ...training.conditions import TextSource
from ...training.config import ConfigError, Section, TrainConfig
from ...training.distributed import Dist
from ...training.preview import save_collage
from ...training.rng import BatchRandom
from ...training.task import load_trainable_model, read_state
from ..control_filters import TrainingControl, load_saliency
from .stage_c_task import StageCTask, preview_decoder

TRAINED_NOTE = "ControlNet trained with cascade-codec"
PREFIX = "controlnet."

# Official per-kind settings (configs/training/controlnet_c_3b_*.yaml).
OFFSET_NOISE = {"canny": 0.0, "inpainting": 0.1, "super_resolution": 0.1, "identity": 0.0}


def resblock_calls(stage_c: StageC) -> int:
    """How many ResBlock calls one Stage C forward makes (the length of a full ``cnet`` list)."""
    total = 0
    for blocks, repmaps in ((stage_c.down_blocks, stage_c.down_repeat_mappers),
                            (stage_c.up_blocks, stage_c.up_repeat_mappers)):
        for level, repmap in zip(blocks, repmaps):
            total += sum(isinstance(b, ResBlock) for b in level) * (len(repmap) + 1)
    return total


def controlnet_for(stage_c: StageC, kind: str, proj_blocks: list[int] | None = None,
                   bottleneck_mode: str | None = None) -> ControlNet:
    """A new ControlNet of ``kind`` sized for ``stage_c``: ``c_proj`` = its width; ``proj_blocks`` default to
    the official ones (for the 64-call 3.6B model), which must fit in the model's ResBlock calls;
    ``bottleneck_mode`` defaults to the kind's official one."""
    if kind not in CONTROLNET_KINDS:
        raise UsageError(f"unknown ControlNet kind {kind!r}; choose one of {', '.join(CONTROLNET_KINDS)}")
    config = dict(get_preset(f"controlnet_{kind}").kwargs(), c_proj=stage_c.config.c_hidden[0])
    if proj_blocks is not None:
        config["proj_blocks"] = list(proj_blocks)
    if bottleneck_mode is not None:
        config["bottleneck_mode"] = bottleneck_mode
    calls = resblock_calls(stage_c)
    if max(config["proj_blocks"]) >= calls:
        raise UsageError(f"proj_blocks {config['proj_blocks']} reach past this Stage C's {calls} ResBlock calls "
                         f"(0–{calls - 1}); give proj_blocks that fit.")
    model = ControlNet(**config)
    model.kind = kind
    return model


class ControlledStageC(nn.Module):
    """Frozen Stage C + trainable ControlNet as one epsilon model: ``forward(x, r, clip_text, clip_text_pooled,
    clip_img, control)`` = ``stage_c(..., cnet=controlnet(control))``.

    This is the module a generic diffusion loop trains: its only trainable parameters are
    ``controlnet.*``. ``train()`` keeps the official modes: the ControlNet's EfficientNet
    BatchNorm frozen, and Stage C in train mode (dropout active) unless ``stage_c_dropout``
    is False.
    """

    def __init__(self, stage_c: StageC, controlnet: ControlNet, stage_c_dropout: bool = True):
        super().__init__()
        self.stage_c = stage_c.requires_grad_(False)
        self.controlnet = controlnet.requires_grad_(True)
        self.stage_c_dropout = stage_c_dropout
        self.train()

    def train(self, mode: bool = True) -> "ControlledStageC":
        """Training mode for the ControlNet; Stage C follows ``stage_c_dropout`` (see the class docstring)."""
        self.training = mode
        self.controlnet.train(mode)
        self.stage_c.train(mode and self.stage_c_dropout)
        return self

    def forward(self, x: torch.Tensor, r: torch.Tensor, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor,
                clip_img: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        param = next(self.controlnet.parameters())
        cnet = self.controlnet(control.to(param.device, param.dtype))
        return self.stage_c(x, r, clip_text, clip_text_pooled, clip_img, cnet=cnet)


class ControlNetSection(Section):
    """``controlnet:`` section (official: the kind's filter, effnet bottleneck, blocks [0,4,8,12,51,55,59,63])."""

    kind: Literal["canny", "inpainting", "super_resolution"] = "canny"
    checkpoint: Optional[str] = Field(None, description="ControlNet file to continue from (else a new one)")
    proj_blocks: Optional[list[int]] = Field(None, description="Stage C ResBlock calls fed (new ControlNet; "
                                                               "default: the official ones)")
    bottleneck_mode: Optional[Literal["effnet", "simple", "large"]] = None
    backbone_init: Literal["effnet_encoder", "random"] = Field(
        "effnet_encoder", description="start an effnet backbone from effnet_encoder.safetensors")
    stage_c_dropout: bool = Field(True, description="Stage C dropout active while training (official quirk)")


class ControlNetTrainingTask(StageCTask):
    """ControlNet: x0 = EfficientNet(image); inputs = Stage C conditions + ``control`` = filter(image)."""

    name = "controlnet"
    section = "controlnet"
    section_model = ControlNetSection
    trains_from = "images"
    images_why = "ControlNet training computes its controls from pixels"

    def __init__(self, cfg: TrainConfig, section: ControlNetSection, d: Dist, source: str = "config"):
        super().__init__(cfg, section, d, source)
        if "offset_noise" not in cfg.model_fields_set:
            cfg.offset_noise = OFFSET_NOISE[section.kind]

    def build(self, dataset: Any) -> nn.Module:
        from ...codec import load_encoder

        cfg, o, dev = self.cfg, self.options, self.d.device
        if cfg.weights is None:
            raise ConfigError(f"{self.source}: ControlNet training needs weights: a folder with "
                              "effnet_encoder.safetensors, text_encoder/ and tokenizer/.")
        if not cfg.model.checkpoint and cfg.model.preset != "tiny":
            raise ConfigError(f"{self.source}: a ControlNet steers trained weights; set model.checkpoint to a Stage C "
                              "file (official: stage_c_bf16.safetensors).")
        src = W.WeightSource(cfg.weights)
        self.dataset_ref = dataset
        self.effnet = load_encoder(src, dev)
        self.text = TextSource.for_run(cfg, dataset, dev, self.source)
        stage_c = load_trainable_model("stage_c", cfg, self.source)
        self.c_clip_img = stage_c.config.c_clip_img
        self.image_encoder = None
        if cfg.conditions.image_embed_p > 0:
            from ..clip_image import ImageEncoder

            self.image_encoder = ImageEncoder.from_pretrained(cfg.weights, device=dev)
        self.controlnet = self._controlnet(stage_c)
        saliency = load_saliency(src, dev) if o.kind == "inpainting" else None
        self.control = TrainingControl(o.kind, saliency=saliency, effnet=self.effnet)
        self.previewer = preview_decoder(cfg, dev)
        return ControlledStageC(stage_c, self.controlnet, o.stage_c_dropout)

    def _controlnet(self, stage_c: StageC) -> ControlNet:
        o = self.options
        try:
            if o.checkpoint:
                net = load_controlnet(o.checkpoint, o.kind, dtype=torch.float32, device="cpu")
                calls = resblock_calls(stage_c)
                if max(net.proj_blocks) >= calls or net.config["c_proj"] != stage_c.config.c_hidden[0]:
                    raise ConfigError(f"{self.source}: {o.checkpoint} (proj_blocks {net.proj_blocks}, c_proj "
                                      f"{net.config['c_proj']}) does not fit this Stage C ({calls} ResBlock calls, "
                                      f"width {stage_c.config.c_hidden[0]}); use a ControlNet made for it.")
            else:
                net = controlnet_for(stage_c, o.kind, o.proj_blocks, o.bottleneck_mode)
                if o.backbone_init == "effnet_encoder" and net.config["bottleneck_mode"] == "effnet":
                    net.init_backbone(self.effnet.state_dict())
        except ValueError as e:
            raise ConfigError(f"{self.source}: controlnet: {e}") from None
        return net.train().requires_grad_(True)

    def clip_image(self, images: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings ``(B,1,C)`` of the images where ``use``, zeros elsewhere (official 10 %)."""
        out = torch.zeros(len(use), 1, self.c_clip_img)
        if self.image_encoder is not None and use.any():
            out[use] = self.image_encoder.encode(images[use]).cpu()
        return out

    @torch.no_grad()
    def inputs(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        from ...codec import encode_pixels

        images = batch["images"].float()
        c = self.cfg.conditions
        keep = rand.uniform() >= c.caption_dropout
        use_img = rand.uniform() >= 1 - c.image_embed_p
        text = self.text.embed(batch, keep)
        dev = self.d.device
        control = self.control(images.to(dev), rand.batch)  # one draw per batch (inpainting), as officially
        x0 = encode_pixels(self.effnet, images)
        return x0, {"clip_text": text.hidden.to(dev), "clip_text_pooled": text.pooled.to(dev),
                    "clip_img": self.clip_image(images, use_img).to(dev), "control": control}

    def _full_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole ControlNet state dict (released key order, BatchNorm buffers) with the trained tensors."""
        full = {k: v.detach().cpu() for k, v in self.controlnet.state_dict().items()}
        for k, v in state.items():
            full[k.removeprefix(PREFIX)] = v
        return full

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        W.save_state(self._full_state(state), path, config=self.controlnet.config, note=TRAINED_NOTE)

    def import_(self, path: Path) -> dict[str, torch.Tensor]:
        names = {k for k, _ in self.controlnet.named_parameters()}
        return {PREFIX + k: v for k, v in read_state(path).items() if k in names}

    @torch.no_grad()
    def preview(self, module: nn.Module, step: int, path: Path) -> Path | None:
        if self.previewer is None:
            return None
        batch = self.preview_batch()
        images = batch["images"].float().to(self.d.device)
        text = self.text.embed(batch, torch.ones(len(images), dtype=torch.bool))
        control = self.control(images, torch.Generator().manual_seed(self.cfg.seed))
        size = tuple(-(-s // 32) for s in images.shape[-2:])
        x0 = self.sample_preview(module, text, size, {"control": control})
        out = self.previewer(x0)
        return save_collage([F.interpolate(images, size=out.shape[-2:], mode="bilinear", antialias=True), out], path)
