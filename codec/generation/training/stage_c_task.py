"""Full fine-tuning of Stage C on EfficientNet latents (official ``train_c.py`` recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import weights as W
from ...codec import load_previewer
from ...diffusion import sample
from ...text import TextEmbedding
from ...training.conditions import TextSource
from ...training.config import TrainConfig
from ...training.preview import save_collage
from ...training.rng import BatchRandom
from ...training.task import Task, load_trainable_model, model_config, read_state

TRAINED_NOTE = "Stage C fine-tuned with cascade-codec"


def preview_decoder(cfg: TrainConfig, device: torch.device) -> nn.Module | None:
    """The Previewer that turns sampled latents into collages, when previews are on and ``weights`` holds
    ``previewer.safetensors``; else ``None`` (no collages: a run never needs one)."""
    if not cfg.preview.every or cfg.weights is None:
        return None
    src = W.WeightSource(cfg.weights)
    return load_previewer(src, device) if src.has(W.PREVIEWER_FILE) else None


def image_embedding(batch: dict[str, Any], use: torch.Tensor, width: int) -> torch.Tensor:
    """CLIP-L image embeddings ``(B,1,width)``: the stored ones where ``use``, zeros elsewhere (and without any)."""
    n = len(use)
    out = torch.zeros(n, 1, width)
    if "clip_img" in batch and torch.is_tensor(batch["clip_img"]):
        stored = batch["clip_img"].float().reshape(n, 1, -1)
        out[use] = stored[use]
    return out


class StageCTask(Task):
    """Stage C: x0 = stored EfficientNet latent; conditions clip_text, clip_text_pooled, clip_img."""

    name = "stage-c"

    def build(self, dataset: Any) -> nn.Module:

        self.dataset_ref = dataset
        self.text = self.text_source(dataset)
        model = load_trainable_model("stage_c", self.cfg, self.source)
        self.model_config = model_config(model)
        self.c_clip_img = model.config.c_clip_img
        self.previewer = preview_decoder(self.cfg, self.d.device)
        return model

    def text_source(self, dataset: Any) -> TextSource:
        """Where text conditions come from (stored embeddings or the encoder)."""
        return TextSource.for_run(self.cfg, dataset, self.d.device, self.source)

    def conditions(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[TextEmbedding, torch.Tensor]:
        """Official condition dropout: 5 % empty captions, CLIP image embedding for 10 % (zeros otherwise)."""
        c = self.cfg.conditions
        keep = rand.uniform() >= c.caption_dropout
        use_img = rand.uniform() >= 1 - c.image_embed_p
        return self.text.embed(batch, keep), image_embedding(batch, use_img, self.c_clip_img)

    def inputs(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        text, img = self.conditions(batch, rand)
        dev = self.d.device
        return batch["latent"].float(), {"clip_text": text.hidden.to(dev), "clip_text_pooled": text.pooled.to(dev),
                                         "clip_img": img.to(dev)}

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        W.save_state(state, path, config=self.model_config, note=TRAINED_NOTE)

    def import_(self, path: Path) -> dict[str, torch.Tensor]:
        return read_state(path)

    # ------------------------------------------------------------------ previews
    def preview_conditions(self, n: int) -> tuple[TextEmbedding, torch.Tensor | None]:
        """Conditions of the collage: ``preview.captions`` (encoded), else the first n dataset items."""
        caps = self.cfg.preview.captions
        if caps:
            if self.text.encoder is None:
                return self.text.empty(), None
            return self.text.encoder.encode(caps[:n]), None
        items = [self.dataset_ref[i] for i in range(min(n, len(self.dataset_ref)))]
        from ...training.data import collate

        batch = collate(items)
        return self.text.embed(batch, torch.ones(len(items), dtype=torch.bool)), batch["latent"]

    @torch.no_grad()
    def preview(self, module: nn.Module, step: int, path: Path) -> Path | None:
        if self.previewer is None:
            return None
        p = self.cfg.preview
        text, real = self.preview_conditions(p.n)
        x0 = self.sample_preview(module, text, real.shape[-2:] if real is not None else (24, 24))
        rows = ([self.previewer(real.to(self.d.device))] if real is not None else []) + [self.previewer(x0)]
        return save_collage(rows, path)

    def sample_preview(self, module: nn.Module, text: TextEmbedding, size: tuple[int, int],
                       extra: dict[str, Any] | None = None) -> torch.Tensor:
        """Latents ``(n,16,*size)`` sampled with the preview settings for ``text`` (CFG against the empty
        caption, zero image embedding); ``extra`` inputs go to both branches (e.g. a ControlNet's control)."""
        p = self.cfg.preview
        n = text.hidden.shape[0]
        dev = self.d.device
        empty = self.text.empty()
        img = torch.zeros(n, 1, self.c_clip_img, device=dev)
        cond = {"clip_text": text.hidden.to(dev), "clip_text_pooled": text.pooled.to(dev), "clip_img": img,
                **(extra or {})}
        uncond = {"clip_text": empty.hidden.to(dev).expand(n, -1, -1), "clip_text_pooled":
                  empty.pooled.to(dev).expand(n, -1, -1), "clip_img": img, **(extra or {})}
        return sample(module, cond, shape=(n, 16, *size), uncond=uncond, steps=p.steps, cfg=p.cfg, shift=p.shift,
                      generator=torch.Generator().manual_seed(self.cfg.seed), device=dev)
