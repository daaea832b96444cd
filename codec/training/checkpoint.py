"""Resumable checkpoints: one folder, replaced atomically.

``{output_dir}/checkpoint/``:

* ``model.safetensors`` — the trained weights in the task's release format (a Stage B/C
  file that loads with ``strict=True``, or an official-layout LoRA file);
* ``ema.safetensors`` — the EMA weights (same format), when EMA is on;
* ``trainer.pt`` — optimiser, learning-rate schedule, loss-weight buckets, the global
  torch RNG state of every process, the position in the data (plain tensors and numbers:
  read with ``torch.load(weights_only=True)``, which cannot run code);
* ``state.json`` — step, epoch, batch, micro-step and the config, for people and tools.

A new checkpoint is written to ``checkpoint.partial/`` and then swapped in, so a kill at any
moment leaves the previous complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint"
TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


@dataclass
class Position:
    """Where training stands: updates done, epoch, next batch of that epoch, micro-steps done."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    micro: int = 0


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """The folder of the resumable checkpoint."""
    return Path(output_dir) / CHECKPOINT


def exists(output_dir: str | os.PathLike) -> bool:
    """Whether a complete checkpoint is there."""
    d = checkpoint_dir(output_dir)
    return (d / STATE_FILE).is_file() and (d / TRAINER_FILE).is_file()


def begin(output_dir: str | os.PathLike) -> Path:
    """A fresh ``checkpoint.partial/`` folder to write into."""
    tmp = Path(output_dir) / (CHECKPOINT + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(output_dir: str | os.PathLike, tmp: Path, trainer: dict[str, Any], position: Position,
           config: dict[str, Any]) -> Path:
    """Write the trainer state into ``tmp`` and swap it in as the checkpoint."""
    torch.save(trainer, tmp / TRAINER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**asdict(position), "time": time.time(), "config": config}, indent=1))
    final = checkpoint_dir(output_dir)
    old = Path(output_dir) / (CHECKPOINT + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load(output_dir: str | os.PathLike) -> tuple[dict[str, Any], Position, dict[str, Any]]:
    """The trainer state, position and saved config of the checkpoint."""
    d = checkpoint_dir(output_dir)
    info = json.loads((d / STATE_FILE).read_text())
    position = Position(**{k: info[k] for k in ("step", "epoch", "batch", "micro")})
    trainer = torch.load(d / TRAINER_FILE, map_location="cpu", weights_only=True)
    return trainer, position, info.get("config", {})


RESUME_FREE = ("max_steps", "checkpoint", "log", "preview", "data.num_workers", "output_dir")


def config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two configs, ignoring those that may change on resume."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in RESUME_FREE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} → {b!r}")
    return out
