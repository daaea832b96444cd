"""What a benchmark ran on: the ``"environment"`` record of every benchmark report.

Numbers from two reports can only be compared knowing whether the machine, the libraries or
the code under test differed, so every report records them the same way, from here.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import torch

from codec.devices import auto_dtype, cpu_flags, cpu_native_bf16, resolve_device
from codec.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def cpu_info() -> dict[str, Any]:
    """The CPU: model name, logical CPU count, torch's CPU capability, the instruction-set flags that decide
    its speed (AVX2, AVX-512, native bf16 by AVX512-BF16 or AMX) and the precision the codec's ``dtype="auto"``
    picks for Stage B and Stage C on it, with the reason (:func:`codec.devices.auto_dtype`)."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux: the model from platform
        pass
    flags = cpu_flags()
    return {
        "model": model, "logical_cpus": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "native_bf16": cpu_native_bf16() is not None, "auto_precision": auto_dtype("cpu")[1],
    }


def package_version(module: str) -> str | None:
    """The version of the importable ``module`` (its ``__version__``, else its distribution's), or None when it
    is missing or fails to import."""
    try:
        m = __import__(module)
    except Exception:  # noqa: BLE001 - optional packages may fail in any way on import
        return None
    found = getattr(m, "__version__", None)
    if found:
        return str(found)
    try:
        return version(module)
    except PackageNotFoundError:
        return None


def git_state(dirty_paths: Sequence[str] | None = None) -> dict[str, Any]:
    """``git_commit`` of the checkout the benchmarks run from (None outside one) and, when ``dirty_paths`` (folders
    of the repository) are given, ``git_dirty``: whether they hold uncommitted changes (None when unknown)."""
    state: dict[str, Any] = {"git_commit": None}
    if dirty_paths is not None:
        state["git_dirty"] = None
    try:
        state["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                             text=True, check=True).stdout.strip()
        if dirty_paths is not None:
            state["git_dirty"] = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", *dirty_paths],
                                                     capture_output=True, text=True).stdout.strip())
    except Exception:  # noqa: BLE001 - no git, or not a checkout: the record says None
        pass
    return state


def environment_record(packages: Sequence[str] = (), dirty_paths: Sequence[str] | None = None,
                       **extra: Any) -> dict[str, Any]:
    """The ``"environment"`` of a benchmark report.

    Always ``python``, ``torch``, ``platform`` and ``cpu`` (:func:`cpu_info`); then ``extra`` as given (a
    benchmark's own settings, such as its thread count); the version of each module in ``packages`` (None when
    missing); ``ram_bytes`` (when psutil is installed); ``cuda_device`` (when CUDA is available); and
    :func:`git_state` for ``dirty_paths``.
    """
    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "platform": platform.platform(), **extra, "cpu": cpu_info()}
    env.update({name: package_version(name) for name in packages})
    try:
        import psutil

        env["ram_bytes"] = psutil.virtual_memory().total
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    env.update(git_state(dirty_paths))
    return env


def device_arg(parser: argparse.ArgumentParser, value: str) -> str:
    """A benchmark's ``--device`` value resolved (``auto`` → a GPU when there is one), as text; a device that is not
    here ends the parse with the sentence naming what is available."""
    try:
        return str(resolve_device(value))
    except UsageError as e:
        parser.error(f"--device: {e}")
