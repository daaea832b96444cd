"""Loading models: keys and shapes checked against the model before any data is read, then tensors streamed
into a model built on the ``meta`` device (never a random-initialised copy). Our own files carry their model
configuration in the safetensors metadata; official files get the preset named by their file name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..devices import auto_dtype
from ..errors import UsageError, WeightsError
from .checkpoint import Checkpoint, SafetensorsHeader, iter_checkpoint, read_header


def check_keys(model: nn.Module, header: SafetensorsHeader | Checkpoint, what: str) -> None:
    """Raise a :class:`WeightsError` listing every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: info.shape for k, info in header.tensors.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if not (missing or unexpected or wrong):
        return

    def listing(keys: list[str], fmt: Callable[[str], str]) -> str:
        shown = "\n".join(f"    {fmt(k)}" for k in keys[:20])
        more = f"\n    … and {len(keys) - 20} more" if len(keys) > 20 else ""
        return shown + more

    parts = [f"{header.path} does not match {what}:"]
    if missing:
        parts.append(f"  {len(missing)} missing key(s):\n" + listing(missing, str))
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected key(s):\n" + listing(unexpected, str))
    if wrong:
        parts.append(f"  {len(wrong)} key(s) with the wrong shape:\n"
                     + listing(wrong, lambda k: f"{k}: file {list(found[k])}, model {list(expected[k])}"))
    parts.append("Is this the right file for this model (e.g. a Stage B lite file given as Stage B large, or a "
                 "diffusers-layout file)?")
    raise WeightsError("\n".join(parts))


def load_module(build: Callable[[], nn.Module], source: str | os.PathLike | Checkpoint,
                dtype: torch.dtype | None, device: torch.device | str, what: str) -> nn.Module:
    """Build a model on the meta device and fill it from a file or :class:`Checkpoint` (strict), in
    ``dtype`` on ``device``.

    ``dtype=None`` keeps each tensor's stored dtype. The model is returned in eval mode
    with ``requires_grad`` off.
    """
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
    with torch.device("meta"):
        model = build()
    check_keys(model, ckpt, what)
    state = dict(iter_checkpoint(ckpt, dtype, device))
    model.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"bug: {what} has tensors not covered by its state dict: {leftovers[:5]}")
    return model.eval().requires_grad_(False)


def configured_builder(cls: Callable[..., nn.Module], config: Mapping[str, Any] | None,
                       preset: Mapping[str, Any] | None = None) -> Callable[[], nn.Module]:
    """A builder of ``cls`` from a file's stored ``config`` over ``preset`` (official files store none)."""
    kwargs = dict(preset or {})
    kwargs.update(config or {})
    return lambda: cls(**kwargs)


def load_configured(cls: Callable[..., nn.Module], path: str | os.PathLike, preset: Mapping[str, Any] | None,
                    dtype: torch.dtype | None, device: torch.device | str) -> tuple[nn.Module, SafetensorsHeader]:
    """Load ``cls`` from ``path``, built with the config stored in the file over ``preset`` (official files
    store none), in ``dtype`` on ``device``; returns the model (eval, frozen) and the file's header."""
    header = read_header(path)
    model = load_module(configured_builder(cls, header.config, preset), path, dtype, device,
                        f"{Path(path).name} ({cls.__name__})")
    return model, header


def default_dtype(device: torch.device | str) -> torch.dtype:
    """What ``dtype="auto"`` means on ``device`` (:func:`codec.devices.auto_dtype`, without the reason)."""
    return auto_dtype(device)[0]


DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
SHORT_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def resolve_dtype(value: str | torch.dtype | None, device: torch.device | str) -> tuple[torch.dtype, str]:
    """``"auto"|None|"bf16"|"fp16"|"fp32"|torch.dtype`` → the dtype and why (``auto``/None: the reason of
    :func:`codec.devices.auto_dtype`; anything else: ``"<dtype>: requested"``)."""
    if value is None or value == "auto":
        return auto_dtype(device)
    if isinstance(value, torch.dtype):
        dtype = value
    elif value in DTYPE_NAMES:
        dtype = DTYPE_NAMES[value]
    else:
        raise UsageError(f"unknown dtype {value!r}; use auto, bf16, fp16 or fp32")
    return dtype, f"{SHORT_DTYPE_NAMES.get(dtype, str(dtype).replace('torch.', ''))}: requested"


def parse_dtype(value: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """``"auto"|None|"bf16"|"fp16"|"fp32"|torch.dtype`` → dtype (:func:`resolve_dtype` without the reason)."""
    return resolve_dtype(value, device)[0]
