"""The one device rule: ``auto`` (or nothing) means CUDA when there is one, else the CPU; a device that does not
exist here is a sentence naming what is available."""

from __future__ import annotations

import os

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
