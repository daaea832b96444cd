"""Shared helpers for the parity tests: the golden-data weight fill rule and the golden loader.

The rule is the one documented in ``tests/data/README.md`` ("Weight fill rule"); the
golden outputs were produced from the official code filled exactly this way.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

DATA_DIR = Path(__file__).resolve().parent / "data"

# Tiny Stage B configuration used for golden_stage_b.safetensors (verbatim from tests/data/README.md).
TINY_STAGE_B_CONFIG = dict(
    c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=32, c_hidden=[8, 16, 32, 32], nhead=[-1, -1, 2, 2],
    blocks=[[1, 1, 2, 1], [1, 2, 1, 1]], block_repeat=[[1, 1, 1, 1], [2, 2, 1, 2]],
    level_config=["CT", "CT", "CTA", "CTA"], c_clip=24, c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3,
    dropout=[0, 0, 0.1, 0.1], self_attn=True, t_conds=["sca"],
)

# Tiny Stage C configuration used for golden_stage_c.safetensors (verbatim from tests/data/README.md).
TINY_STAGE_C_CONFIG = dict(
    c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=64, c_hidden=[64, 64], nhead=[2, 2], blocks=[[2, 3], [3, 2]],
    block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"], c_clip_text=32, c_clip_text_pooled=32,
    c_clip_img=24, c_clip_seq=4, kernel_size=3, dropout=[0.1, 0.1], self_attn=True, t_conds=["sca", "crp"],
    switch_level=[False],
)

# Tiny Stage A configuration used for golden_stage_a.safetensors (verbatim from tests/data/README.md).
TINY_STAGE_A_CONFIG = dict(levels=2, bottleneck_blocks=2, c_hidden=32, c_latent=4, codebook_size=64,
                           scale_factor=0.43)


@torch.no_grad()
def fill_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every float tensor of ``module.state_dict(keep_vars=True)`` in order from one generator.

    ``*running_var`` gets ``rand(shape) + 0.5``; every other float tensor gets
    ``randn(shape) / sqrt(fan_in)`` with ``fan_in = t[0].numel()`` if ``t.ndim > 1`` else
    ``t.numel()``. Non-float tensors (``num_batches_tracked``) are skipped.
    """
    g = torch.Generator().manual_seed(seed)
    for key, t in module.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        if key.endswith("running_var"):
            value = torch.rand(t.shape, generator=g) + 0.5
        else:
            fan_in = t[0].numel() if t.ndim > 1 else t.numel()
            value = torch.randn(t.shape, generator=g) / math.sqrt(fan_in)
        t.copy_(value)
    return module


@torch.no_grad()
def bn1_(module: torch.nn.Module) -> int:
    """The "bn1" variant of the fill: ``weight += 1`` on every affine ``BatchNorm2d``; returns how many.

    With the plain fill every BN gamma is about N(0, 1/C), so deep EfficientNet outputs
    barely depend on the input; this keeps the signal alive.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.affine:
            m.weight += 1.0
            n += 1
    return n


def load_golden(name: str) -> dict[str, torch.Tensor]:
    """All tensors of ``tests/data/<name>`` (``.safetensors`` appended when missing)."""
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return load_file(str(DATA_DIR / name))


def sub_dict(golden: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``golden`` whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


def assert_close_scaled(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4, name: str = "") -> None:
    """Parity check relative to the reference's magnitude.

    Shapes and dtypes must match and everything must be finite; then
    ``max|out - ref| <= rtol * max|ref|`` and, elementwise,
    ``|out - ref| <= atol + rtol * |ref|`` with ``atol = 0.1 * rtol * max|ref|``.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in output"
    scale = ref.abs().max().item()
    assert scale > 0, f"{name}: reference is all zeros"
    err = (out - ref).abs().max().item()
    assert err <= rtol * scale, f"{name}: max abs err {err:.3e} > {rtol:g} * max|ref| ({scale:.3e})"
    torch.testing.assert_close(out, ref, rtol=rtol, atol=0.1 * rtol * scale, msg=lambda m: f"{name}: {m}")
