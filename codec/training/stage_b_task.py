"""Stage B fine-tuning on Stage A latents (official ``train_b.py`` recipe).

Per batch (official): one encoder scale ``f ~ U(0.5, 1)``; the images are nearest-resized to
``floor(side·f/32)·32`` and EfficientNet encodes them for a random 90 % of the samples
(zeros for the rest); the text condition is the pooled CLIP-G embedding (5 % empty
caption); the noise is the official pyramid noise (levels with sides 1…16).

Images: a dataset item's ``images`` when present, else Stage A's decoding of its stored
Stage A latent (``effnet_from: pixels``, the official route up to Stage A's reconstruction
error). ``effnet_from: stored`` instead nearest-resizes the stored EfficientNet latent by
``f`` — no EfficientNet or Stage A at training time, but only an approximation of the
official scale augmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .. import weights as W
from ..diffusion import sample
from ..stage_a import StageA
from .conditions import TextSource
from .config import ConfigError, Section
from .objectives import pyramid_noise_per_sample
from .preview import save_collage
from .rng import BatchRandom
from .task import Task, load_trainable_model, model_config, read_state


class StageBSection(Section):
    """``stage_b:`` section (official: scale 0.5–1, 90 % encoder kept, pyramid noise)."""

    effnet_from: Literal["pixels", "stored"] = "pixels"
    encoder_scale: tuple[float, float] = (0.5, 1.0)
    encoder_keep: float = Field(0.9, ge=0, le=1)
    pyramid_noise: bool = True


class StageBTask(Task):
    """Stage B: x0 = Stage A latent; conditions effnet (random scale, 10 % dropped) and pooled text."""

    name = "stage-b"
    section = "stage_b"
    section_model = StageBSection
    store_fields = ("latent", "stage_a", "clip_text_pooled")
    required_fields = ("latent", "stage_a")

    def build(self, dataset: Any) -> nn.Module:
        from .. import codec as C

        self.dataset_ref = dataset
        self.text = TextSource.for_run(self.cfg, dataset, self.d.device, self.source)
        model = load_trainable_model("stage_b", self.cfg, self.source)
        self.model_config = model_config(model)
        self.effnet = self.stage_a = None
        needs_pixels = self.options.effnet_from == "pixels" or self.cfg.preview.every
        if needs_pixels:
            if self.cfg.weights is None:
                raise ConfigError(f"{self.source}: Stage B training with effnet_from: pixels (and previews) needs "
                                  "weights: a folder with stage_a.safetensors and effnet_encoder.safetensors.")
            src = W.WeightSource(self.cfg.weights)
            src.require([W.STAGE_A_FILE, W.EFFNET_FILE])
            self.stage_a, _ = W.load_configured(StageA, src.path(W.STAGE_A_FILE), None, torch.float32, self.d.device)
            self.effnet = C.load_encoder(src, self.d.device)
        return model

    def _pixels(self, batch: dict[str, Any], x0: torch.Tensor) -> torch.Tensor:
        if "images" in batch and torch.is_tensor(batch["images"]):
            return batch["images"].float().to(self.d.device)
        with torch.no_grad():
            return self.stage_a.decode(x0.to(self.d.device)).float().clamp(0, 1)

    @torch.no_grad()
    def effnet_condition(self, batch: dict[str, Any], x0: torch.Tensor, factor: float,
                         keep: torch.Tensor) -> torch.Tensor:
        """EfficientNet latents at encoder scale ``factor`` for the kept samples, zeros for the others."""
        from ..codec import encode_pixels

        if self.options.effnet_from == "stored":
            lat = batch["latent"].float()
            size = (max(1, int(lat.shape[-2] * factor)), max(1, int(lat.shape[-1] * factor)))
            return F.interpolate(lat, size=size, mode="nearest") * keep.view(-1, 1, 1, 1)
        images = self._pixels(batch, x0)
        h, w = (max(32, int(s * factor // 32 * 32)) for s in images.shape[-2:])
        out = torch.zeros(images.shape[0], 16, h // 32, w // 32)
        if keep.any():
            small = F.interpolate(images[keep], size=(h, w), mode="nearest")
            out[keep] = encode_pixels(self.effnet, small)
        return out

    def inputs(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        o, c = self.options, self.cfg.conditions
        x0 = batch["stage_a"].float()
        lo, hi = o.encoder_scale
        factor = lo + (hi - lo) * rand.batch_uniform()
        keep_caption = rand.uniform() >= c.caption_dropout
        keep_effnet = rand.uniform() < o.encoder_keep
        pooled = self.text.embed(batch, keep_caption).pooled
        effnet = self.effnet_condition(batch, x0, factor, keep_effnet)
        return x0, {"effnet": effnet.to(self.d.device), "clip": pooled.to(self.d.device)}

    def noise(self, x0: torch.Tensor, rand: BatchRandom) -> torch.Tensor:
        if not self.options.pyramid_noise:
            return super().noise(x0, rand)
        return pyramid_noise_per_sample(x0, rand)

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        W.save_state(state, path, config=self.model_config, note="Stage B fine-tuned with cascade-codec")

    def import_(self, path: Path) -> dict[str, torch.Tensor]:
        return read_state(path)

    @torch.no_grad()
    def preview(self, module: nn.Module, step: int, path: Path) -> Path | None:
        if self.stage_a is None:
            return None
        batch = self.preview_batch()
        n = len(batch["stage_a"])
        x0 = batch["stage_a"].float().to(self.d.device)
        keep = torch.ones(n, dtype=torch.bool)
        # official evaluation: EfficientNet of the full image; unconditional = zeros and the empty caption
        eff = self.effnet_condition(batch, x0, 1.0, keep).to(self.d.device)
        pooled = self.text.embed(batch, keep).pooled.to(self.d.device)
        empty = self.text.empty().pooled.to(self.d.device).expand(n, -1, -1)
        z = sample(module, {"effnet": eff, "clip": pooled}, shape=tuple(x0.shape),
                   uncond={"effnet": torch.zeros_like(eff), "clip": empty}, steps=self.cfg.preview.steps, cfg=1.1,
                   generator=torch.Generator().manual_seed(self.cfg.seed), device=self.d.device)
        return save_collage([self.stage_a.decode(x0), self.stage_a.decode(z)], path)
