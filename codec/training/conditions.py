"""Text conditions for training: stored CLIP-G embeddings when the store has them, else the text encoder.

The adapter hides where the embeddings come from. A dataset item with ``clip_text_pooled``
``(1,C)`` (and, for Stage C, ``clip_text`` ``(77,C)``) tensors has stored embeddings (then no text
encoder is needed); the embedding of the empty caption — which condition dropout uses —
comes from the dataset's ``empty_text_embedding`` attribute (a ``TextEmbedding`` or a
``(hidden, pooled)`` pair) or, failing that, from the text encoder. Without stored
embeddings, captions are encoded on the fly. Dropped captions become ``""`` (official).
"""

from __future__ import annotations

from typing import Any

import torch

from ..text import TextEmbedding, TextEncoder
from .config import ConfigError, TrainConfig


def has_stored_text(dataset: Any) -> bool:
    """Whether the dataset's items carry stored text embeddings."""
    flag = getattr(dataset, "has_text_embeddings", None)
    if flag is not None:
        return bool(flag)
    return len(dataset) > 0 and "clip_text_pooled" in dataset[0]


class TextSource:
    """Text conditions of a batch with per-sample caption dropout."""

    def __init__(self, encoder: TextEncoder | None, stored: bool, empty: TextEmbedding | None):
        self.encoder, self.stored, self._empty = encoder, stored, empty

    @classmethod
    def for_run(cls, cfg: TrainConfig, dataset: Any, device: torch.device, source: str,
                need_encoder: bool = False) -> "TextSource":
        """Pick stored embeddings or the encoder from ``data.text``; load the encoder when needed."""
        stored = has_stored_text(dataset)
        mode = cfg.data.text
        if mode == "stored" and not stored:
            raise ConfigError(f"{source}: data.text is 'stored' but {cfg.data.store} has no stored text embeddings; "
                              "use data.text: auto or encoder.")
        use_stored = stored and mode != "encoder" and not need_encoder
        empty = getattr(dataset, "empty_text_embedding", None)
        if isinstance(empty, (tuple, list)):
            empty = TextEmbedding(hidden=empty[0], pooled=empty[1])
        encoder = None
        if not use_stored or empty is None:
            if cfg.weights is None:
                why = ("new tokens are trained" if need_encoder else
                       "the store has no stored text embeddings" if not use_stored else
                       "the store does not hold the empty-caption embedding needed for caption dropout")
                raise ConfigError(f"{source}: the text encoder is needed ({why}); set weights: to a folder with "
                                  "text_encoder/ and tokenizer/ (the Hugging Face stable-cascade layout).")
            encoder = TextEncoder.from_pretrained(cfg.weights, device=device)
        return cls(encoder, use_stored, empty)

    def empty(self) -> TextEmbedding:
        """Conditions of the empty caption ``(1,77,C)`` and ``(1,1,C)``."""
        if self._empty is None:
            self._empty = self.encoder.encode([""])
        return TextEmbedding(hidden=self._empty.hidden.reshape(1, *self._empty.hidden.shape[-2:]).float(),
                             pooled=self._empty.pooled.reshape(1, 1, -1).float())

    def captions(self, batch: dict[str, Any], keep: torch.Tensor) -> list[str]:
        """Captions with the dropped ones replaced by ``""``."""
        caps = batch.get("caption") or [""] * len(keep)
        return [str(c) if k else "" for c, k in zip(caps, keep.tolist())]

    @torch.no_grad()
    def embed(self, batch: dict[str, Any], keep: torch.Tensor) -> TextEmbedding:
        """``hidden`` ``(B,77,C)`` and ``pooled`` ``(B,1,C)`` for the batch; ``keep[i]`` False → empty caption."""
        if not self.stored:
            out = self.encoder.encode(self.captions(batch, keep))
            return TextEmbedding(hidden=out.hidden.cpu(), pooled=out.pooled.cpu())
        empty = self.empty()
        drop = ~keep
        pooled = batch["clip_text_pooled"].float().reshape(len(keep), 1, -1).clone()
        pooled[drop] = empty.pooled.cpu()
        hidden = batch["clip_text"].float().clone() if "clip_text" in batch else None  # Stage B needs only pooled
        if hidden is not None:
            hidden[drop] = empty.hidden.cpu()
        return TextEmbedding(hidden=hidden, pooled=pooled)
