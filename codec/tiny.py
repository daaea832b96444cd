"""Tiny *random* weights in the official file layout, for tests and offline demos.

They exercise every code path of the real models at a fraction of the size, but they
are untrained: images decoded with them are noise. Every file carries the note
``TINY_NOTE`` in its metadata, and ``cascade info`` shows it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import weights as W
from .presets import create_model, get_preset

TINY_NOTE = "TINY RANDOM WEIGHTS for tests/demos - not a trained model; decoded images are noise"

def _fill_random(model: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """Non-zero weights everywhere (``randn / sqrt(fan_in)``), so every branch of the network matters in tests."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel() if p.ndim > 1 else p.numel()) ** 0.5)
    return model


def write_tiny_weights(folder: str | os.PathLike, seed: int = 0, stage_b: str = "lite", clip: bool = True) -> Path:
    """Write tiny random weights with official file names into ``folder``.

    ``stage_a``, ``effnet_encoder``, ``stage_b_<lite|large>``, ``stage_c_lite``, ``previewer``
    and, with ``clip``, the CLIP text and image encoders in the Hugging Face layout
    (``text_encoder/``, ``tokenizer/``, ``image_encoder/``); the cached empty-caption
    embedding is then that text encoder's. The EfficientNet is the real (full-size)
    architecture, since its shape is fixed.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    stage_b_model = _fill_random(create_model("stage_b_tiny"), g)
    W.save_module(create_model("stage_a_tiny"), folder / W.STAGE_A_FILE, get_preset("stage_a_tiny").kwargs(), TINY_NOTE)
    W.save_module(create_model("efficientnet_v2_s"), folder / W.EFFNET_FILE, None, TINY_NOTE)
    W.save_module(stage_b_model, folder / W.STAGE_B_FILES[stage_b]["fp32"], get_preset("stage_b_tiny").kwargs(),
                  TINY_NOTE)
    W.save_module(create_model("previewer_tiny"), folder / W.PREVIEWER_FILE, get_preset("previewer_tiny").kwargs(),
                  TINY_NOTE)
    W.save_module(_fill_random(create_model("stage_c_tiny"), g), folder / W.STAGE_C_FILES["lite"]["fp32"],
                  get_preset("stage_c_tiny").kwargs(), TINY_NOTE)
    if clip:
        from .text import TextEncoder

        write_tiny_text_encoder(folder, seed=seed)
        write_tiny_image_encoder(folder, seed=seed)
        pooled = TextEncoder.from_pretrained(folder).encode([""]).pooled
    else:
        pooled = torch.randn(1, 1, get_preset("stage_b_tiny").config.c_clip, generator=g)
    save_file({"pooled": pooled.contiguous()}, str(folder / W.EMPTY_CAPTION_FILE), metadata={W.META_NOTE: TINY_NOTE})
    return folder


def write_tiny_image_encoder(folder: str | os.PathLike, width: int = get_preset("stage_c_tiny").config.c_clip_img,
                             seed: int = 0) -> Path:
    """Write a tiny random ``CLIPVisionModelWithProjection`` (224² input, ``width``-d image embeds) into
    ``folder/image_encoder`` (the Hugging Face layout)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=width, num_hidden_layers=2,
                              num_attention_heads=2, image_size=224, patch_size=32)
    CLIPVisionModelWithProjection(config).save_pretrained(str(Path(folder) / "image_encoder"))
    return Path(folder)


def write_tiny_text_encoder(folder: str | os.PathLike, width: int = get_preset("stage_b_tiny").config.c_clip, seed: int = 0) -> Path:
    """Write a tiny random CLIP text encoder and a byte-level CLIP tokenizer (no merges) into
    ``folder/text_encoder`` and ``folder/tokenizer`` (the Hugging Face repo layout)."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="!")
    tokenizer.save_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                            projection_dim=width, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"])
    CLIPTextModelWithProjection(config).save_pretrained(str(folder / "text_encoder"))
    return folder


def write_tiny_controlnet(folder: str | os.PathLike, kind: str = "canny", seed: int = 0) -> Path:
    """Write a tiny random ``controlnet/<kind>.safetensors`` (non-zero projections, so it changes Stage C's
    output) into ``folder``; it loads with ``codec.codec.load_controlnet(folder, kind)``."""
    from .controlnet import CONTROLNET_FILES

    preset = get_preset(f"controlnet_{kind}_tiny")
    model = _fill_random(create_model(preset.name), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for m in model.modules():  # BatchNorm gains near 1, so the deep EfficientNet keeps the input's signal
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight += 1.0
    return W.save_module(model, Path(folder) / CONTROLNET_FILES[kind], preset.kwargs(), TINY_NOTE)
