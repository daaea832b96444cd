"""How much memory a decode needs and how much there is, checked before the work starts.

A decode's largest tensors grow with the output's pixels (Stage A works at full resolution), so a huge output size
can run for many minutes and then exhaust the machine's memory. :func:`activation_bytes` measures a module's
activations on a small probe input with forward hooks and scales them to the real size; :func:`available_bytes`
reads what the device has free. Both are estimates: the check refuses only what clearly cannot fit.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["activation_bytes", "available_bytes"]


@torch.no_grad()
def activation_bytes(module: nn.Module, run: Callable[[], object], scale: float) -> int:
    """Bytes of the largest output of any submodule while ``run()`` calls ``module`` on a probe input, times
    ``scale`` (real input size / probe size), times 1.5 (other tensors alive beside it). For the mini codec's
    20000×2000 decode this gives 10.7 GB where the process was seen to peak at 8.6 GB."""
    largest = 0

    def hook(_m, _inputs, output) -> None:
        nonlocal largest
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if torch.is_tensor(t):
                largest = max(largest, t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return int(1.5 * largest * scale)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: the GPU's free memory, or the host's available RAM (Linux ``MemAvailable``);
    ``None`` when it cannot be read."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
