"""Building blocks shared by Stage B and Stage C.

Every module here keeps the parameter names of the official Stable Cascade code, so a
released state dict loads with ``strict=True``. The forward passes compute the same
functions as the official ones but are written for speed: the residual MLPs run in
channels-last layout without round trips, and attention goes through
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response normalisation on channels-last ``(B, H, W, C)`` input."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sqrt of a sum of squares is ~3× faster than vector_norm over non-contiguous dims on CPU;
        # fp16 keeps vector_norm, whose squares cannot overflow. Under autograd vector_norm too: the
        # gradient of sqrt at 0 is inf (NaN for an all-zero channel), vector_norm's is defined as 0.
        if x.dtype == torch.float16 or (x.requires_grad and torch.is_grad_enabled()):
            gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        else:
            gx = x.square().sum(dim=(1, 2), keepdim=True).sqrt()
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        # gamma * (x * nx) + beta + x, in one pass over x
        return torch.addcmul(self.beta, x, torch.addcmul(torch.ones_like(nx), self.gamma, nx))


class ResBlock(nn.Module):
    """Depthwise conv, channel LayerNorm, then a GRN MLP; the residual is the block input.

    ``c_skip`` extra channels (a U-Net skip) are concatenated after the norm.
    """

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)
        h = F.layer_norm(h, self.norm.normalized_shape, eps=self.norm.eps)
        if x_skip is not None:
            h = torch.cat([h, x_skip.permute(0, 2, 3, 1)], dim=-1)
        return self.channelwise(h).permute(0, 3, 1, 2) + x


class PackedAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s packed parameter layout.

    Parameters are ``in_proj_weight`` (q, k, v stacked), ``in_proj_bias`` and
    ``out_proj``, exactly as in the released checkpoints, but the forward pass
    projects queries only for the image tokens and calls SDPA directly.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        """Attend from ``q_in`` ``(B, Lq, C)`` to ``kv_in`` ``(B, Lk, C)``."""
        c, h = self.embed_dim, self.num_heads
        q = self.project(q_in, 0, c)
        k, v = self.project(kv_in, c, 3 * c).chunk(2, dim=-1)
        bsz = q_in.shape[0]
        q = q.view(bsz, -1, h, c // h).transpose(1, 2)
        k = k.reshape(bsz, -1, h, c // h).transpose(1, 2)
        v = v.reshape(bsz, -1, h, c // h).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(bsz, -1, c))

    def project(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the packed input projection applied to ``x`` (q: ``0:c``, k and v: ``c:3c``)."""
        return F.linear(x, self.in_proj_weight[start:stop], self.in_proj_bias[start:stop])


class Attention2D(nn.Module):
    """Attention over the pixels of a feature map, optionally also over the image tokens themselves."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.attn = PackedAttention(c, nhead, dropout=dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, self_attn: bool = False) -> torch.Tensor:
        bsz, c, hgt, wid = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        if self_attn:
            kv = torch.cat([tokens, kv], dim=1)
        out = self.attn(tokens, kv)
        return out.transpose(1, 2).reshape(bsz, c, hgt, wid)


class AttnBlock(nn.Module):
    """Pre-norm attention block whose keys/values are the image tokens followed by the condition tokens."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.kv_mapper(kv)
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn)


class FeedForwardBlock(nn.Module):
    """GRN MLP block (present in the official code, unused by the released configs)."""

    def __init__(self, c: int, dropout: float = 0.0):
        super().__init__()
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(c, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), nn.Linear(c * 4, c)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x.permute(0, 2, 3, 1), self.norm.normalized_shape, eps=self.norm.eps)
        return x + self.channelwise(h).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """Affine modulation ``x * (1 + a) + b`` from the noise-level embedding and extra conditions."""

    def __init__(self, c: int, c_timestep: int, conds: Sequence[str] = ("sca",)):
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)
        self.conds = list(conds)
        for name in self.conds:
            setattr(self, f"mapper_{name}", nn.Linear(c_timestep, c * 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        chunks = t.chunk(len(self.conds) + 1, dim=1)
        ab = self.mapper(chunks[0])
        for i, name in enumerate(self.conds):
            ab = ab + getattr(self, f"mapper_{name}")(chunks[i + 1])
        a, b = ab[:, :, None, None].chunk(2, dim=1)
        return torch.addcmul(b, x, 1 + a)


def r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise condition ``r`` (``(B,)``), always computed in fp32.

    Layout as official: ``[sin(r f_k)] ++ [cos(r f_k)]`` with
    ``f_k = exp(-k ln(max_positions) / (c_r/2 - 1))``, zero-padded when ``c_r`` is odd.
    """
    r = r.float() * max_positions
    half = c_r // 2
    freqs = torch.arange(half, device=r.device, dtype=torch.float32).mul(-math.log(max_positions) / (half - 1)).exp()
    emb = r[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def make_block(block_type: str, c: int, c_cond: int, nhead: int, c_r: int, t_conds: Sequence[str],
               c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0, self_attn: bool = True) -> nn.Module:
    """Build one block from its official one-letter code: C (ResBlock), A (attention), F (feed-forward), T (timestep)."""
    if block_type == "C":
        return ResBlock(c, c_skip, kernel_size=kernel_size, dropout=dropout)
    if block_type == "A":
        return AttnBlock(c, c_cond, nhead, self_attn=self_attn, dropout=dropout)
    if block_type == "F":
        return FeedForwardBlock(c, dropout=dropout)
    if block_type == "T":
        return TimestepBlock(c, c_r, conds=t_conds)
    raise ValueError(f"block type {block_type!r} is not one of C, A, F, T")


def _unwrap(block: nn.Module) -> nn.Module:
    return getattr(block, "_fsdp_wrapped_module", block)


class CascadeUNet(nn.Module):
    """The U-Net body shared by Stage B and Stage C.

    Subclasses build ``down_blocks``, ``down_downscalers``, ``down_repeat_mappers``,
    ``up_blocks``, ``up_upscalers`` and ``up_repeat_mappers`` (names as official) with
    :meth:`build_levels` and call :meth:`run_unet`. ``control`` is an optional iterator of per-ResBlock-call
    additive features (ControlNet); it is advanced once before every ResBlock call.
    """

    def build_levels(self, c_hidden: Sequence[int], c_cond: int, nhead: Sequence[int], c_r: int,
                     blocks: Sequence[Sequence[int]], block_repeat: Sequence[Sequence[int]],
                     level_config: Sequence[str], kernel_size: int, dropout: Sequence[float],
                     self_attn: Sequence[bool], scaler: Callable[[int, int, str, int], nn.Module]) -> None:
        """Create the levels as the official code does (same module names, order and skip widths).

        Level ``i`` holds ``blocks[0][i]`` (down) / ``blocks[1][-1-i]`` (up) repetitions of
        ``level_config[i]`` (C = ResBlock, T = TimestepBlock, A = AttnBlock), re-run
        ``block_repeat`` times with 1×1 mappers in between. ``scaler(c_in, c_out, mode, i)``
        makes the module between level ``i-1`` and ``i`` (``mode`` ``"down"`` or ``"up"``);
        it is preceded by a LayerNorm. Needs ``self.t_conds``.
        """
        n = len(c_hidden)

        def block(kind: str, i: int, c_skip: int = 0) -> nn.Module:
            return make_block(kind, c_hidden[i], c_cond, nhead[i], c_r, self.t_conds, c_skip=c_skip,
                              kernel_size=kernel_size, dropout=dropout[i], self_attn=self_attn[i])

        def norm(c: int) -> nn.Module:
            return LayerNorm2d(c, elementwise_affine=False, eps=1e-6)

        self.down_blocks = nn.ModuleList()
        self.down_downscalers = nn.ModuleList()
        self.down_repeat_mappers = nn.ModuleList()
        for i in range(n):
            self.down_downscalers.append(
                nn.Sequential(norm(c_hidden[i - 1]), scaler(c_hidden[i - 1], c_hidden[i], "down", i))
                if i > 0 else nn.Identity())
            self.down_blocks.append(nn.ModuleList(
                block(kind, i) for _ in range(blocks[0][i]) for kind in level_config[i]))
            self.down_repeat_mappers.append(nn.ModuleList(
                nn.Conv2d(c_hidden[i], c_hidden[i], kernel_size=1) for _ in range(block_repeat[0][i] - 1)))

        self.up_blocks = nn.ModuleList()
        self.up_upscalers = nn.ModuleList()
        self.up_repeat_mappers = nn.ModuleList()
        for i in reversed(range(n)):
            self.up_upscalers.append(
                nn.Sequential(norm(c_hidden[i]), scaler(c_hidden[i], c_hidden[i - 1], "up", i))
                if i > 0 else nn.Identity())
            self.up_blocks.append(nn.ModuleList(
                block(kind, i, c_skip=c_hidden[i] if (i < n - 1 and j == k == 0) else 0)
                for j in range(blocks[1][::-1][i]) for k, kind in enumerate(level_config[i])))
            self.up_repeat_mappers.append(nn.ModuleList(
                nn.Conv2d(c_hidden[i], c_hidden[i], kernel_size=1) for _ in range(block_repeat[1][::-1][i] - 1)))

    def _run_block(self, block: nn.Module, x: torch.Tensor, r_embed: torch.Tensor, clip: torch.Tensor,
                   skip: torch.Tensor | None, control: Iterator[torch.Tensor | None] | None) -> torch.Tensor:
        kind = _unwrap(block)
        if isinstance(kind, ResBlock):
            if control is not None:
                extra = next(control)
                if extra is not None:
                    x = x + F.interpolate(extra.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=True)
            return block(x, skip)
        if isinstance(kind, AttnBlock):
            return block(x, clip)
        if isinstance(kind, TimestepBlock):
            return block(x, r_embed)
        return block(x)

    def run_unet(self, x: torch.Tensor, r_embed: torch.Tensor, clip: torch.Tensor,
                 control: Iterator[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Down path then up path; returns the features before ``clf``."""
        level_outputs: list[torch.Tensor] = []
        for blocks, downscaler, repmap in zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers):
            x = downscaler(x)
            for j in range(len(repmap) + 1):
                for block in blocks:
                    x = self._run_block(block, x, r_embed, clip, None, control)
                if j < len(repmap):
                    x = repmap[j](x)
            level_outputs.insert(0, x)

        x = level_outputs[0]
        for i, (blocks, upscaler, repmap) in enumerate(zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)):
            for j in range(len(repmap) + 1):
                for k, block in enumerate(blocks):
                    skip = level_outputs[i] if (k == 0 and i > 0) else None
                    if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                        x = F.interpolate(x.float(), skip.shape[-2:], mode="bilinear", align_corners=True).to(skip.dtype)
                    x = self._run_block(block, x, r_embed, clip, skip, control)
                if j < len(repmap):
                    x = repmap[j](x)
            x = upscaler(x)
        return x

    def embed_r(self, r: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the embeddings of ``r`` and of each of ``self.t_conds`` (0 when not given)."""
        parts = [r_embedding(r, self.c_r)]
        for name in self.t_conds:
            value = extra.get(name)
            parts.append(r_embedding(torch.zeros_like(r) if value is None else value, self.c_r))
        return torch.cat(parts, dim=1)


def patch_embedding(c_in: int, c_hidden: int, patch_size: int) -> nn.Sequential:
    """The U-Nets' input: pixel-unshuffle by ``patch_size``, 1×1 conv, LayerNorm (official ``embedding``)."""
    return nn.Sequential(
        nn.PixelUnshuffle(patch_size),
        nn.Conv2d(c_in * patch_size**2, c_hidden, kernel_size=1),
        LayerNorm2d(c_hidden, elementwise_affine=False, eps=1e-6),
    )


def patch_head(c_hidden: int, c_out: int, patch_size: int) -> nn.Sequential:
    """The U-Nets' output: LayerNorm, 1×1 conv, pixel-shuffle by ``patch_size`` (official ``clf``)."""
    return nn.Sequential(
        LayerNorm2d(c_hidden, elementwise_affine=False, eps=1e-6),
        nn.Conv2d(c_hidden, c_out * patch_size**2, kernel_size=1),
        nn.PixelShuffle(patch_size),
    )


def autocast_for(module: nn.Module, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the module's dtype when its weights are bf16/fp16 and the caller has not set autocast.

    The official code always ran low-precision weights under autocast (fp32 norms,
    fp32 timestep embedding); doing it here spares the caller from managing it. A module
    with a ``compute_dtype`` attribute stores its weights in another dtype than it computes
    in and manages precision itself (``codec/generation/fp16.py``): autocast is switched off.
    """
    if getattr(module, "compute_dtype", None) is not None:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = next(module.parameters()).dtype
    if dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def init_cascade_weights(model: CascadeUNet, depth: int) -> None:
    """Official training init shared by Stage B and Stage C.

    Xavier-uniform on every Conv2d/Linear (ConvTranspose keeps PyTorch's default), zero
    biases, a 0.02-gain input embedding, a zero output head, identity timestep
    modulation and residual branches scaled by ``sqrt(1/depth)``.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PackedAttention):
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)
    nn.init.xavier_uniform_(model.embedding[1].weight, 0.02)
    nn.init.zeros_(model.clf[1].weight)
    for level in list(model.down_blocks) + list(model.up_blocks):
        for block in level:
            if isinstance(block, (ResBlock, FeedForwardBlock)):
                block.channelwise[-1].weight.data *= (1 / depth) ** 0.5
            elif isinstance(block, TimestepBlock):
                for layer in block.modules():
                    if isinstance(layer, nn.Linear):
                        nn.init.zeros_(layer.weight)
