"""The one device rule: ``auto`` (or nothing) means CUDA when there is one, else the CPU; a device that does not
exist here is a sentence naming what is available. And the one precision rule: what ``dtype="auto"`` gives
Stage B and Stage C on a device (:func:`auto_dtype`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Collection
from pathlib import Path

import torch

from .errors import UsageError


def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, ``cuda:N`` for every GPU, ``mps`` on Apple silicon."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` → a GPU when there is one, else ``cpu``; anything else is checked to exist. Under
    torchrun, ``auto`` and ``cuda`` (no index) mean the process's own GPU, ``cuda:$LOCAL_RANK``."""
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"{device!r} is not a device; use auto, cpu, cuda, cuda:N or mps (available here: "
                         f"{', '.join(available_devices())})") from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index is not None and dev.index >= torch.cuda.device_count())):
        raise UsageError(f"device {device!r} is not available here (available: {', '.join(available_devices())})")
    if dev.type == "cuda" and dev.index is None and os.environ.get("LOCAL_RANK") is not None:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if dev.type == "mps" and "mps" not in available_devices():
        raise UsageError(f"device 'mps' is not available here (available: {', '.join(available_devices())})")
    return dev


# /proc/cpuinfo flag → the name a reason gives it. Either gives oneDNN native bf16 dot products; without them bf16
# conv/linear are emulated through fp32 and run several times slower than fp32 itself.
NATIVE_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512_BF16"}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as ``/proc/cpuinfo`` lists them (``avx2``, ``avx512_bf16``, …); empty where
    that file does not exist (not Linux). Read once per process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return next((frozenset(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.startswith("flags")), frozenset())


def cpu_native_bf16(flags: Collection[str] | None = None) -> str | None:
    """The CPU feature that gives PyTorch native bf16 math (``"AMX-BF16"`` or ``"AVX512_BF16"``), else None.

    ``flags``: the CPU's flags (default: :func:`cpu_flags`, this machine's). torch's own
    ``torch.backends.cpu.get_cpu_capability()`` says ``AVX512`` with or without them, so the flags decide. None too
    when PyTorch was built without oneDNN, which is what runs bf16 convolutions and matrix products on the CPU."""
    if not torch.backends.mkldnn.is_available():
        return None
    flags = cpu_flags() if flags is None else flags
    return next((name for flag, name in NATIVE_BF16_FLAGS.items() if flag in flags), None)


def auto_dtype(device: torch.device | str) -> tuple[torch.dtype, str]:
    """The precision of Stage B and Stage C when none is asked for (``dtype="auto"``) on ``device``, with the reason
    in a few words (``"bf16: CPU has AVX512_BF16"``).

    bf16 on CUDA (the released precision) and on CPUs with native bf16 (:func:`cpu_native_bf16`), where bf16
    convolutions run about twice as fast as fp32; fp32 on other CPUs (emulated bf16 is slower than fp32) and on any
    other device. The EfficientNet encoder and Stage A are not covered: they run fp32, as in the official code."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16, "bf16: CUDA (the released precision)"
    if dev.type == "cpu":
        feature = cpu_native_bf16()
        if feature:
            return torch.bfloat16, f"bf16: CPU has {feature}"
        return torch.float32, "fp32: CPU has no native bf16 (AVX512_BF16 or AMX-BF16)"
    return torch.float32, f"fp32: default on {dev.type}"
