"""CLIP-G text conditioning (OpenCLIP ViT-bigG/14 text tower through transformers).

Official semantics: captions are tokenised to exactly 77 tokens (padding ``"!"``,
truncation); the sequence condition is the last hidden state *before* the final layer
norm (``hidden_states[-1]``); the pooled condition is the projected ``text_embeds``
(not normalised) as ``(B,1,1280)``. The unconditional text is the encoding of ``""``.

Weights come from the ``text_encoder/`` and ``tokenizer/`` folders of the Hugging Face
``stabilityai/stable-cascade`` layout (a local folder or the repo id), or from a ComfyUI
single-file checkpoint (which holds the weights; the tokenizer still comes from ``tokenizer/``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .errors import UsageError
from .weights import OFFICIAL_REPO, WeightsError, WeightSource, hf_subfolders

if TYPE_CHECKING:
    from .layouts.official import Located

MAX_TOKENS = 77


@dataclass
class TextEmbedding:
    """Text conditions for a batch of captions."""

    hidden: torch.Tensor
    pooled: torch.Tensor


def hf_source(source: str | os.PathLike | WeightSource) -> str | os.PathLike:
    """The folder or repo id holding the Hugging Face folders of ``source`` (a weight source's own)."""
    if isinstance(source, WeightSource):
        return source.folder if source.folder is not None else source.repo_id
    return source


def missing_text_folders(source: str | os.PathLike | WeightSource) -> tuple[Path, list[str]] | None:
    """For a local ``source``: the folder that must hold the text encoder's Hugging Face folders and those of
    them it lacks (``[]``: all there; a ComfyUI checkpoint holds the encoder, so only ``tokenizer``); ``None``
    for a repo id, which is fetched on use."""
    from .layouts import comfyui
    from .layouts.locate import bundled

    found = bundled(source, "text_encoder")
    root, needed = (comfyui.hf_root(found[0]), ["tokenizer"]) if found else (hf_source(source), ["text_encoder",
                                                                                              "tokenizer"])
    root = Path(root).expanduser()
    if not root.is_dir():
        return None
    return root, [d for d in needed if not (root / d).is_dir()]


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-file loading bars (ours show the work that takes time), restoring the setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class TextEncoder:
    """Tokenizer + ``CLIPTextModelWithProjection`` producing Stable Cascade's text conditions."""

    def __init__(self, tokenizer, model, device: torch.device | str = "cpu"):
        if len(tokenizer) <= 2:
            raise WeightsError(
                f"the CLIP tokenizer has only {len(tokenizer)} entries: transformers returns such a placeholder when "
                "it could not reach the hub, and it would map every word to the same id. Point at a local "
                "tokenizer/ folder with vocab.json and merges.txt.")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.pool_at: str | None = None

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | WeightSource = OFFICIAL_REPO,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Load from a folder (or repo id) with ``text_encoder/`` and ``tokenizer/`` subfolders, or from a ComfyUI
        checkpoint (the file, or a folder with one and no ``text_encoder/``) and the ``tokenizer/`` beside it."""
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

        from .layouts import comfyui
        from .layouts.locate import bundled

        found = bundled(source, "text_encoder")
        if found is None:
            root = hf_subfolders(hf_source(source), ["text_encoder", "tokenizer"],
                                 "text conditioning (the CLIP-G text encoder)")
            with quiet_transformers():
                model = CLIPTextModelWithProjection.from_pretrained(str(root / "text_encoder"), torch_dtype=dtype,
                                                                    local_files_only=True)
        else:
            src, loc = found
            model = load_clip(src, loc, CLIPTextModelWithProjection, CLIPTextConfig, dtype, device)
            root = hf_subfolders(comfyui.hf_root(src), ["tokenizer"],
                                 f"the CLIP tokenizer ({loc.files[0]} holds the text encoder's weights, not its "
                                 "tokenizer)")
        with quiet_transformers():
            tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        return cls(tokenizer, model, device)

    def truncated_part(self, caption: str) -> str | None:
        """The text of ``caption`` beyond CLIP's 77 tokens (which the embedding ignores), or ``None`` if it fits."""
        ids = self.tokenizer(caption, truncation=False)["input_ids"]
        return self.tokenizer.decode(ids[MAX_TOKENS - 1:-1]) if len(ids) > MAX_TOKENS else None

    def _check_length(self, captions: Sequence[str]) -> None:
        for caption in captions:
            cut = self.truncated_part(caption)
            if cut is not None:
                warnings.warn(f"caption is longer than {MAX_TOKENS} tokens; CLIP reads only {MAX_TOKENS}, so this "
                              f"part is ignored: {cut!r}", stacklevel=3)

    def tokenize(self, captions: Sequence[str], warn: bool = True) -> dict[str, torch.Tensor]:
        """Captions → ``input_ids`` and ``attention_mask`` ``(B,77)`` on the encoder's device (official padding);
        ``warn`` about captions longer than 77 tokens (see :meth:`truncated_part`)."""
        if warn:
            self._check_length(captions)
        tokens = self.tokenizer(list(captions), truncation=True, padding="max_length", max_length=MAX_TOKENS,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(self.device), "attention_mask": tokens["attention_mask"].to(self.device)}

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEmbedding:
        """Token ids → conditions, with gradients when the model has trainable parts (new-token training).

        ``pool_at`` chooses the pooled position: ``None`` lets transformers decide (first EOS,
        or the largest id when the config's ``eos_token_id`` is 2), ``"eos"`` forces the first
        EOS, ``"argmax"`` the largest id (old transformers; with an added token this is the
        added token, not EOS — official.md §9.2).
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        pooled = out.text_embeds
        if self.pool_at is not None:
            if self.pool_at == "eos":
                pos = (input_ids == self.tokenizer.eos_token_id).int().argmax(dim=-1)
            elif self.pool_at == "argmax":
                pos = input_ids.int().argmax(dim=-1)
            else:
                raise UsageError(f"pool_at must be None, 'eos' or 'argmax', got {self.pool_at!r}")
            last = out.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), pos]
            pooled = self.model.text_projection(last)
        return TextEmbedding(hidden=out.hidden_states[-1].float(), pooled=pooled.float().unsqueeze(1))

    @torch.no_grad()
    def encode(self, captions: str | Sequence[str], warn: bool = True) -> TextEmbedding:
        """Captions → ``hidden`` ``(B,77,C)`` (before the final layer norm) and ``pooled`` ``(B,1,C)``.

        ``warn``: warn about captions longer than 77 tokens (see :meth:`truncated_part`).
        """
        if isinstance(captions, str):
            captions = [captions]
        return self.embed_tokens(**self.tokenize(captions, warn))


def load_clip(src: WeightSource, loc: Located, model_cls: type, config_cls: type, dtype: torch.dtype,
              device: torch.device | str) -> torch.nn.Module:
    """A transformers CLIP model (``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection``) from a
    ComfyUI checkpoint: keys checked first, then tensors streamed in ``dtype``."""
    from . import weights as W
    from .layouts.comfyui import open_section

    ckpt, config = open_section(src, loc)
    hf_config = config_cls(**config)
    with torch.device("meta"):
        skeleton = model_cls(hf_config)
    W.check_keys(skeleton, ckpt, f"{loc.label} ({model_cls.__name__})")
    state = dict(W.iter_checkpoint(ckpt, dtype, device))
    with quiet_transformers():  # transformers builds it with its non-persistent buffers (position ids)
        model = model_cls.from_pretrained(None, config=hf_config, state_dict=state, dtype=dtype)
    return model.to(device)
