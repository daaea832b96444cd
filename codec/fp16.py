"""Overflow-safe float16 inference for Stage C: fp16 weights and matrix multiplies, fp32 activations.

Why plain fp16 fails. Stage C's residual stream is never normalised: ResBlocks and
AttnBlocks add their branch outputs to it and every TimestepBlock multiplies it by
``1 + a(r)``. The branches only read a LayerNorm'd copy, so nothing feeds the stream's
size back and nothing bounds it. In the released 3.6B model it grows block after block
through the last group of the up path (the final 8 CTA triplets) past 65504, the largest
float16 number; the inf then meets a LayerNorm and the output is NaN (black images). The
official readme says fp16 "overflows"; users report NaN/black images with the large model
and working images with the lite one (diffusers#6970, ComfyUI#2824); the community
"Stable-Cascade-FP16-fixed" checkpoint traced the growth to that last group.

What this mode keeps from fp16: weights stored in float16 (half the memory of fp32; the
large model needs 7.2 GB) and float16 matrix multiplies (tensor cores on GPUs without
bf16, Apple MPS). What it changes:

* Every ``nn.Linear`` and the packed attention input projection — 99.6% of the large
  model's parameters and ~95% of its FLOPs at 1024² — holds fp16 weights and multiplies in
  fp16. Before the multiply each input row is scaled by a power of two so that
  ``max|row| · max_i Σ_j |W_ij| ≤ 2**15``: no partial or final sum can reach the fp16
  limit, whatever the activation scale and even where the backend accumulates in fp16
  (MPS, cuBLAS reduced-precision reductions). The product is scaled back in fp32 (exactly:
  a power of two) and the bias added in fp32.
* Everything between the multiplies stays in fp32: the residual stream, LayerNorms,
  GELU and GRN, the timestep modulation, the depthwise and 1×1 convolutions (0.4% of the
  parameters, kept in fp32), attention softmax (``scaled_dot_product_attention`` on fp32
  q/k/v) and the condition embedding.

What is left is rounding to fp16 (11 significant bits against bf16's 8) of weights and of
the multiply inputs and outputs; there is no range limit. ``benchmarks/stage_c_fp16.py``
measures it against fp32 and bf16. The mode is for inference; convert after loading (or
load into a converted model: the bounds are recomputed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import PackedAttention
from .errors import NonFiniteError, UsageError

FP16_MAX = 65504.0
# Multiply inputs are scaled so the worst-case |sum| stays at half the fp16 range.
PRODUCT_LIMIT = 2.0**15
# Scale exponents are clamped so zero rows (scale → inf) and inf rows (scale → 0) stay harmless.
MAX_EXPONENT = 100.0


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                row_bound: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias`` with an fp16 ``weight`` and multiply that cannot overflow; fp32 in and out.

    ``row_bound`` is ``max_i Σ_j |weight_ij|`` (see :func:`row_l1_bound`). Each row of
    ``x`` (last dimension) is scaled by ``2**e`` with ``e`` the largest integer such that
    ``max|row| · 2**e · row_bound ≤ 2**15`` before it is rounded to fp16; the product is
    divided by ``2**e`` in fp32. Non-finite rows stay non-finite.
    """
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    exponent = torch.floor(torch.log2(PRODUCT_LIMIT / (amax * row_bound))).clamp(-MAX_EXPONENT, MAX_EXPONENT)
    scale = torch.exp2(exponent)
    y = F.linear((x * scale).half(), weight).float()
    return y / scale if bias is None else torch.addcdiv(bias, y, scale)


def row_l1_bound(weight: torch.Tensor) -> torch.Tensor:
    """``max_i Σ_j |weight_ij|`` in fp32: the largest output of ``weight`` for inputs bounded by 1."""
    return weight.detach().float().abs().sum(dim=1).max()


def _to_half(weight: torch.Tensor, name: str) -> torch.Tensor:
    weight = weight.detach()
    if not weight.is_meta:
        peak = weight.abs().max().item() if weight.numel() else 0.0
        if not peak <= FP16_MAX:
            raise UsageError(f"Stage C weight {name!r} holds |w| = {peak:.4g}, beyond the float16 range "
                             f"(±{FP16_MAX:.0f}), so it cannot be stored in fp16; run Stage C in bf16 or fp32.")
    return weight.to(torch.float16)


def _settle(module: nn.Module, weight_name: str, bias_name: str) -> None:
    """Bring a converted module's weight to fp16, its bias to fp32, and refresh its ``row_bound`` buffer."""
    weight, bias = getattr(module, weight_name), getattr(module, bias_name)
    if weight.dtype != torch.float16:
        setattr(module, weight_name, nn.Parameter(_to_half(weight, weight_name), requires_grad=False))
    if bias is not None and bias.dtype != torch.float32:
        setattr(module, bias_name, nn.Parameter(bias.detach().float(), requires_grad=False))
    module.register_buffer("row_bound", row_l1_bound(getattr(module, weight_name)), persistent=False)


class HalfLinear(nn.Module):
    """A linear layer with an fp16 ``weight`` and fp32 ``bias`` (the same keys as ``nn.Linear``), fp32 in and out.

    See :func:`half_linear`. Loading a state dict converts the tensors and recomputes the bound.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "weight"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(_to_half(weight, name), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.register_buffer("row_bound", row_l1_bound(self.weight), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "weight") -> "HalfLinear":
        """Convert an ``nn.Linear`` (any dtype)."""
        return cls(linear.weight, linear.bias, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half_linear(x, self.weight, self.bias, self.row_bound)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        _settle(self, "weight", "bias")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weight, fp32 math"


class HalfPackedAttention(PackedAttention):
    """:class:`PackedAttention` with an fp16 ``in_proj_weight`` multiplied by :func:`half_linear`.

    q, k and v come out in fp32, so attention itself runs in fp32; ``out_proj`` is a :class:`HalfLinear`.
    """

    @classmethod
    def from_attention(cls, attention: PackedAttention, name: str = "in_proj_weight") -> "HalfPackedAttention":
        """Convert a :class:`PackedAttention` (any dtype); its ``out_proj`` is converted too if needed."""
        with torch.device("meta"):
            new = cls(attention.embed_dim, attention.num_heads, dropout=attention.dropout)
        new.in_proj_weight = nn.Parameter(_to_half(attention.in_proj_weight, name), requires_grad=False)
        new.in_proj_bias = nn.Parameter(attention.in_proj_bias.detach().float(), requires_grad=False)
        out_proj = attention.out_proj
        new.out_proj = out_proj if isinstance(out_proj, HalfLinear) else HalfLinear.from_linear(out_proj, name)
        new.register_buffer("row_bound", row_l1_bound(new.in_proj_weight), persistent=False)
        return new.train(attention.training)

    def project(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return half_linear(x, self.in_proj_weight[start:stop], self.in_proj_bias[start:stop], self.row_bound)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        _settle(self, "in_proj_weight", "in_proj_bias")


def _inputs_to_float(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(v: Any) -> Any:
        return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _swap_children(model: nn.Module, kind: type, convert) -> None:
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind) and not isinstance(child, (HalfLinear, HalfPackedAttention)):
                setattr(parent, name, convert(child, f"{prefix}.{name}".lstrip(".")))


def make_half_safe(model: nn.Module) -> nn.Module:
    """Convert a Stage C (any :class:`~codec.blocks.CascadeUNet`) in place to overflow-safe fp16 inference.

    Linear and attention-projection weights become fp16, every other parameter and buffer
    fp32; floating inputs are cast to fp32 and the output is fp32. ``state_dict`` keys are
    unchanged. Converting layer by layer keeps the peak memory near the model's own size.
    Calling it twice is a no-op. Raises ``ValueError`` when a weight does not fit fp16.
    """
    if getattr(model, "compute_dtype", None) is not None:
        return model
    _swap_children(model, nn.Linear, HalfLinear.from_linear)
    _swap_children(model, PackedAttention, HalfPackedAttention.from_attention)
    _rest_to_float(model)
    # blocks.autocast_for sees this and switches autocast off: the modules manage precision themselves.
    model.compute_dtype = torch.float32
    model.register_forward_pre_hook(_inputs_to_float, with_kwargs=True)
    # load_state_dict(assign=True) replaces tensors with the file's dtype: bring them back.
    model.register_load_state_dict_post_hook(lambda module, _keys: _rest_to_float(module))
    return model


def _rest_to_float(model: nn.Module) -> None:
    """Every parameter and floating buffer outside the fp16 layers to fp32."""
    for module in model.modules():
        if isinstance(module, (HalfLinear, HalfPackedAttention)):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype != torch.float32:
                setattr(module, name, nn.Parameter(param.detach().float(), requires_grad=param.requires_grad))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_floating_point() and buf.dtype != torch.float32:
                module._buffers[name] = buf.float()


def to_precision(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype``, where ``torch.float16`` means :func:`make_half_safe` (never plain fp16)."""
    return make_half_safe(model) if dtype == torch.float16 else model.to(dtype)


def check_plain_fp16_output(out: torch.Tensor) -> torch.Tensor:
    """Raise :class:`~codec.errors.NonFiniteError` when a plain-fp16 Stage C output holds NaN/inf (it overflowed)."""
    if not torch.isfinite(out).all():

        bad = (~torch.isfinite(out)).sum().item()
        raise NonFiniteError(
            f"Stage C in plain float16 overflowed: {bad} of {out.numel()} output values are NaN/inf because its "
            f"activations exceed the float16 maximum ({FP16_MAX:.0f}); call StageC.half_safe() (fp16 weights, "
            "overflow-safe math) or run it in bf16 or fp32.")
    return out
