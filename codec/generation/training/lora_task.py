"""LoRA (and new-token) training on a frozen Stage C (official ``train_c_lora.py`` recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field
from torch import nn

from ...training.conditions import TextSource
from ...training.config import ConfigError, Section
from ...training.rng import BatchRandom
from ...training.task import read_state
from ..lora import DEFAULT_FILTERS, LoRA, LoraNetwork, TokenDelta, save_lora, to_kohya
from ..tokens import add_train_tokens, attach_token_delta
from .stage_c_task import StageCTask, image_embedding


class LoraSection(Section):
    """``lora:`` section (official defaults: rank 4, filters ['.attn'], alpha 1)."""

    rank: int = Field(4, ge=1)
    alpha: float = Field(1.0, gt=0)
    module_filters: list[str] = Field(default_factory=lambda: list(DEFAULT_FILTERS))
    train_tokens: list[tuple[str, Optional[str]]] = Field(default_factory=list)
    stage_c_dropout: Literal["official", "on", "off"] = Field(
        "official", description="Stage C's dropout while the LoRA trains: 'official' = on for the first micro-batch "
        "only (the official script samples after it and leaves Stage C in eval mode), 'on', or 'off'")
    pool_at: Literal["eos", "argmax"] = "eos"
    export_kohya: bool = Field(False, description="also write <name>.kohya.safetensors (ComfyUI naming)")


class LoraModel(nn.Module):
    """Frozen Stage C with LoRAs attached, plus the text model when tokens are trained.

    ``forward(x, r, clip_img, clip_text=None, clip_text_pooled=None, input_ids=None,
    attention_mask=None)``: with token ids the text conditions are computed here, with
    gradients flowing to the token deltas.
    """

    def __init__(self, stage_c: nn.Module, text_encoder: Any | None):
        super().__init__()
        self.stage_c = stage_c
        self.text = text_encoder.model if text_encoder is not None else None
        self._encoder = text_encoder
        self.stage_c_dropout = True  # set per micro-batch by the task

    def train(self, mode: bool = True) -> "LoraModel":
        """Training mode for the LoRAs and token deltas; Stage C's dropout follows ``stage_c_dropout``."""
        super().train(mode)
        self.stage_c.train(mode and self.stage_c_dropout)
        return self

    def forward(self, x: torch.Tensor, r: torch.Tensor, clip_img: torch.Tensor, clip_text: torch.Tensor | None = None,
                clip_text_pooled: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is not None:
            emb = self._encoder.embed_tokens(input_ids, attention_mask)
            clip_text, clip_text_pooled = emb.hidden, emb.pooled
        return self.stage_c(x, r, clip_text, clip_text_pooled, clip_img)


def _lora_key(target: str, part: str) -> str:
    module, _, param = target.rpartition(".")
    return f"stage_c.{module}.parametrizations.{param}.0.{part}"


TOKEN_KEY = "text.text_model.embeddings.token_embedding.parametrizations.weight.0.embeddings"


class LoraTask(StageCTask):
    """Train only LoRA weights (and token deltas); save the official ``lora_*.safetensors`` layout."""

    name = "lora"
    section = "lora"
    section_model = LoraSection

    def text_source(self, dataset: Any) -> TextSource:
        """New tokens need the text encoder on the fly; otherwise as Stage C."""
        return TextSource.for_run(self.cfg, dataset, self.d.device, self.source,
                                  need_encoder=bool(self.options.train_tokens))

    def build(self, dataset: Any) -> nn.Module:
        o = self.options
        if self.cfg.distributed.strategy == "fsdp" and self.d.active:
            raise ConfigError(f"{self.source}: LoRA training uses ddp (LoRA weights are small; the official LoRA "
                              "recipe does not shard either); set distributed.strategy: ddp.")
        if not self.cfg.model.checkpoint and self.cfg.model.preset != "tiny":
            raise ConfigError(f"{self.source}: a LoRA adapts trained weights; set model.checkpoint to a Stage C file.")
        stage_c = super().build(dataset).requires_grad_(False)  # frozen; dropout per lora.stage_c_dropout
        self.network = LoraNetwork.create(stage_c, o.module_filters, rank=o.rank, alpha=o.alpha, seed=self.cfg.seed)
        self.network.attach(stage_c)
        self.network.requires_grad_(True)
        self.token_delta: TokenDelta | None = None
        encoder = None
        if o.train_tokens:
            encoder = self.text.encoder
            encoder.pool_at = o.pool_at
            ids = add_train_tokens(encoder, [list(t) for t in o.train_tokens])
            encoder.model.requires_grad_(False)
            self.token_delta = attach_token_delta(encoder, ids)
            self.token_delta.requires_grad_(True)
            self.network.embeddings = self.token_delta
        elif self.text.encoder is not None:
            self.text.encoder.pool_at = o.pool_at
        self.model = LoraModel(stage_c, encoder)
        return self.model

    def _set_dropout(self, rand: BatchRandom) -> None:
        """Stage C's dropout for this micro-batch (``lora.stage_c_dropout``)."""
        policy = self.options.stage_c_dropout
        self.model.stage_c_dropout = policy == "on" or (policy == "official" and rand.micro_step == 0)
        self.model.train(self.model.training)

    def inputs(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        self._set_dropout(rand)
        if not self.options.train_tokens:
            return super().inputs(batch, rand)
        c = self.cfg.conditions
        keep = rand.uniform() >= c.caption_dropout
        use_img = rand.uniform() >= 1 - c.image_embed_p
        tokens = self.text.encoder.tokenize(self.text.captions(batch, keep))
        return batch["latent"].float(), {**tokens, "clip_img": image_embedding(batch, use_img, self.c_clip_img)
                                         .to(self.d.device)}

    def _network_from(self, state: dict[str, torch.Tensor]) -> LoraNetwork:
        loras = []
        for target, live in zip(self.network.targets, self.network.weights):
            lora = LoRA(live.lora_up.shape[0], live.lora_down.shape[1], rank=live.rank)
            lora.scale = live.scale
            with torch.no_grad():
                lora.lora_down.copy_(state[_lora_key(target, "lora_down")])
                lora.lora_up.copy_(state[_lora_key(target, "lora_up")])
            loras.append(lora)
        embeddings = None
        if self.token_delta is not None:
            embeddings = TokenDelta(self.token_delta.indices.tolist(), self.token_delta.embeddings.shape[1])
            with torch.no_grad():
                embeddings.embeddings.copy_(state[TOKEN_KEY])
        return LoraNetwork(self.network.targets, loras, embeddings)

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        network = self._network_from(state)
        o = self.options
        save_lora(network, path, o.module_filters, [list(t) for t in o.train_tokens], o.pool_at)
        if o.export_kohya:
            from safetensors.torch import save_file

            save_file(to_kohya(network), str(path.with_name(path.stem + ".kohya.safetensors")))

    def import_(self, path: Path) -> dict[str, torch.Tensor]:
        raw = read_state(path)
        state = {}
        for i, target in enumerate(self.network.targets):
            state[_lora_key(target, "lora_down")] = raw[f"weights.{i}.lora_down"]
            state[_lora_key(target, "lora_up")] = raw[f"weights.{i}.lora_up"]
        if self.token_delta is not None:
            state[TOKEN_KEY] = raw["embeddings.embeddings"]
        return state
