"""The dataset a training task trains from, built from its config: what ``cascade train`` hands the trainer.

A task declares what it needs (``Task.trains_from``): a Zarr latent store (``data.store``), read with
those of the task's ``store_fields`` that the store holds, or images (``data.images``: a folder, manifest
or tar shards; short side → ``data.image_size``, centre crop), where one smaller than ``data.min_size`` or
unreadable is skipped and listed in ``OUTPUT_DIR/skipped.jsonl``; with ``data.cache`` decoded once into memory
(:class:`~datasets_tools.image_dataset.CachedImages`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from codec.training.config import ConfigError
from codec.training.task import Task

from .dataset import LatentDataset, store_fields
from .image_dataset import CachedImages, ImageDataset


def training_dataset(task: Task) -> torch.utils.data.Dataset:
    """The dataset ``task`` trains from (see the module docstring); a :class:`ConfigError` that names the key
    to set when the config lacks the data or the store lacks a field the task needs."""
    cfg = task.cfg
    if task.trains_from == "images":
        if cfg.data.images is None:
            why = task.images_why or f"task {task.name} trains from images"
            raise ConfigError(f"{task.source}: {why}; set data.images to an image folder, a .csv/.jsonl manifest or "
                              ".tar shards.")
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        images = ImageDataset(cfg.data.images, size=cfg.data.image_size,
                              errors_file=Path(cfg.output_dir) / "skipped.jsonl", min_size=cfg.data.min_size)
        return CachedImages(images, progress=None if task.d.main else False) if cfg.data.cache else images
    if cfg.data.store is None:
        raise ConfigError(f"{task.source}: task {task.name} trains from latents; set data.store to a Zarr latent "
                          "store (`cascade encode-dataset IMAGES STORE`).")
    held = store_fields(cfg.data.store)
    missing = [f for f in task.required_fields if f not in held]
    if missing:
        raise ConfigError(f"{task.source}: data.store {cfg.data.store} has no {', '.join(missing)}; encode it with "
                          "`cascade encode-dataset --stage-a` (Stage A latents) into a new store.")
    return LatentDataset(cfg.data.store, buckets=cfg.data.buckets,
                         fields=tuple(f for f in task.store_fields if f in held), shard_cache=cfg.data.shard_cache)
