"""The ControlNet-specific part of training (official ``train/train_c_controlnet.py``); the loop is generic.

What the official recipe does, and this task reproduces:

* only the ControlNet trains — all of it, the EfficientNet backbone's weights included,
  but with that backbone's BatchNorm statistics frozen (eval mode);
* Stage C is frozen yet left in train mode, so its dropout (0.1) is active — an
  official quirk, kept by default (``stage_c_dropout=False`` switches it off);
* per step: control = filter(images) (no gradient), latents = EfficientNet(images)
  (or precomputed ones), t ~ the official random t, ε ~ N(0,1) (+ ``offset_noise``·N(0,1)
  per channel for the inpainting and super-resolution configs), x_t = a·x0 + b·ε,
  Stage C predicts ε from x_t, the text/image conditions and ``cnet = controlnet(control)``;
  loss = mean over the batch of P2-weighted per-sample MSE (the ControlNet script always
  uses P2, never the adaptive weight).

The generic loop supplies the conditions (with the official condition dropout),
bf16 autocast, AdamW (lr 1e-4), warm-up, gradient clipping (1.0) over
:meth:`ControlNetTask.parameters`, accumulation, EMA, checkpoints and logging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import weights as W
from ..blocks import ResBlock
from ..controlnet import ControlNet
from ..diffusion import CosineSchedule, diffuse, p2_loss_weight
from ..effnet import EfficientNetEncoder
from ..errors import UsageError
from ..presets import CONTROLNET_KINDS, get_preset
from ..stage_c import StageC
from .control_filters import TrainingControl

ControlFn = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]

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


def offset_noise_like(x0: torch.Tensor, offset_noise: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ε for ``x0`` as the official GDF draws it: N(0,1), plus ``offset_noise``·N(0,1) per sample and channel."""
    noise = torch.randn(x0.shape, generator=generator)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn(x0.size(0), x0.size(1), *[1] * (x0.ndim - 2), generator=generator)
    return noise.to(x0.device, x0.dtype)


@dataclass
class StepLoss:
    """One step's loss: ``loss`` (the scalar to back-propagate) and the per-sample unweighted MSE."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    loss_weight: torch.Tensor


class ControlNetTask:
    """Batch → loss for ControlNet training, following the official recipe (see the module docstring).

    ``control`` maps images ``(B,3,H,W)`` in [0,1] (and a generator) to the ControlNet
    input — :class:`~codec.generation.control_filters.TrainingControl` for the released
    kinds, or any callable for a new kind. ``effnet`` encodes the images when a batch
    has no precomputed ``latents``.
    """

    def __init__(self, stage_c: StageC, controlnet: ControlNet, control: ControlFn,
                 effnet: EfficientNetEncoder | None = None, offset_noise: float = 0.0,
                 stage_c_dropout: bool = True, schedule: CosineSchedule | None = None):
        self.model = ControlledStageC(stage_c, controlnet, stage_c_dropout)
        self.stage_c, self.controlnet = stage_c, controlnet
        self.control = control
        self.effnet = None if effnet is None else effnet.eval().requires_grad_(False)
        self.offset_noise = offset_noise
        self.schedule = schedule or CosineSchedule()

    @classmethod
    def for_kind(cls, kind: str, stage_c: StageC, controlnet: ControlNet, *,
                 effnet: EfficientNetEncoder | None = None, saliency: nn.Module | None = None,
                 **kwargs) -> "ControlNetTask":
        """The official task of a released kind (canny, inpainting, super_resolution): its training filter
        and offset noise."""
        control = TrainingControl(kind, saliency=saliency, effnet=effnet)
        kwargs.setdefault("offset_noise", OFFSET_NOISE[kind])
        return cls(stage_c, controlnet, control, effnet=effnet, **kwargs)

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer and the gradient clipping see: every ControlNet parameter."""
        return list(self.controlnet.parameters())

    def train_mode(self) -> None:
        """Modes for training steps (call again after sampling previews in eval mode)."""
        self.model.train()

    def models_to_save(self) -> dict[str, nn.Module]:
        """Modules a checkpoint stores, by file stem (``controlnet.safetensors``, as officially)."""
        return {"controlnet": self.controlnet}

    def save(self, path: str | os.PathLike) -> Path:
        """Save the whole ControlNet (BatchNorm statistics included, as the released files) with its config;
        it loads with ``codec.codec.load_controlnet(path)``."""
        return W.save_module(self.controlnet, path, self.controlnet.config)

    @torch.no_grad()
    def latents(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Precomputed ``batch['latents']`` or the EfficientNet latents of ``batch['images']``."""
        if "latents" in batch:
            return batch["latents"]
        if self.effnet is None:
            raise UsageError("the batch has no 'latents' and the task has no EfficientNet encoder to compute them")
        return self.effnet.encode(batch["images"])

    @torch.no_grad()
    def control_input(self, batch: Mapping[str, torch.Tensor],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The training filter on ``batch['images']`` (no gradient). Previews pass ``controlnet(control)`` as
        ``cnet`` to both the conditional and the unconditional branch."""
        return self.control(batch["images"], generator)

    def loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> StepLoss:
        """The official ControlNet loss for one batch.

        ``batch``: ``images`` (B,3,H,W) in [0,1]; ``clip_text`` (B,77,C), ``clip_text_pooled``
        (B,1,C), optional ``clip_img`` (B,1,C_img; zeros when absent) — conditions after the
        loop's condition dropout; optional ``latents`` (B,16,h,w). Random numbers (filter
        draws, t, noise) come from ``generator`` (CPU) when given, in that order; Stage C
        dropout uses torch's global RNG.
        """
        control = self.control_input(batch, generator)
        x0 = self.latents(batch)
        bsz = x0.size(0)
        t = self.schedule.random_t(bsz, generator)
        noised, noise, logsnr, noise_cond = diffuse(x0, t, offset_noise_like(x0, self.offset_noise, generator),
                                                    schedule=self.schedule)
        clip_img = batch.get("clip_img")
        if clip_img is None:
            clip_img = x0.new_zeros(bsz, 1, self.stage_c.config.c_clip_img)
        pred = self.model(noised, noise_cond, batch["clip_text"], batch["clip_text_pooled"], clip_img, control)
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
        weight = p2_loss_weight(logsnr).to(per_sample.device)
        return StepLoss((per_sample * weight).mean(), per_sample.detach(), weight)
