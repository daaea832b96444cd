"""What a training task supplies to the loop, and helpers shared by the tasks.

A task (Stage C, LoRA, Stage B, ControlNet …) says:

* ``build(dataset)`` → the module to train, on the CPU, trained parameters with
  ``requires_grad`` (frozen parts inside it are fine); its ``forward(x_t, r, **inputs)``
  predicts epsilon;
* ``inputs(batch, rand)`` → clean latents ``x0`` and the keyword inputs of ``forward``
  (condition dropout happens here, with the per-sample generators of ``rand``);
* ``noise(x0, rand)`` → the epsilon to add (default: standard normal per sample);
* ``export(state, path)`` / ``import_(path)`` → the trained tensors (``named_parameters``
  names of the module) to and from the file users get (checkpoints hold that file);
* ``preview(module, step, path)`` → an optional collage;
* ``trains_from`` (with ``store_fields``/``required_fields`` or ``images_why``) → what data it trains
  from. A task never builds its dataset: the caller does (``cascade train`` with
  :func:`datasets_tools.training_data.training_dataset`) and hands it to :func:`.run.train`.

``section``/``section_model`` name and validate the task's own YAML section.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel
from torch import nn

from .. import weights as W
from ..presets import FAMILIES, get_preset, list_presets
from .config import ConfigError, TrainConfig
from .distributed import Dist
from .rng import BatchRandom


class Task:
    """Base class of training tasks (see the module docstring)."""

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    section_model: ClassVar[type[BaseModel] | None] = None

    # False for tasks that are not epsilon-prediction (an autoencoder): the loop then calls :meth:`loss`.
    diffusion: ClassVar[bool] = True
    # True for models trained from scratch with BatchNorm: their buffers are checkpointed with the weights.
    save_buffers: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig, section: BaseModel | None, d: Dist, source: str = "config"):
        self.cfg, self.options, self.d, self.source = cfg, section, d, source

    def build(self, dataset: Any) -> nn.Module:
        """The module to train (see the module docstring)."""
        raise NotImplementedError

    def inputs(self, batch: dict[str, Any], rand: BatchRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        """Clean latents and model inputs for a local batch."""
        raise NotImplementedError

    def loss(self, module: nn.Module, batch: dict[str, Any], rand: BatchRandom) -> torch.Tensor:
        """Per-sample loss ``(B,)`` of a task with ``diffusion = False`` (autoencoders)."""
        raise NotImplementedError

    def noise(self, x0: torch.Tensor, rand: BatchRandom) -> torch.Tensor:
        """Epsilon for ``x0``: standard normal, one generator per sample."""
        return rand.normal(x0.shape[1:]).to(x0.dtype)

    def export(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """Write the trained tensors as the user-facing file."""
        raise NotImplementedError

    def import_(self, path: Path) -> dict[str, torch.Tensor]:
        """Read what :meth:`export` wrote, with the module's parameter names."""
        raise NotImplementedError

    def preview(self, module: nn.Module, step: int, path: Path) -> Path | None:
        """Write a sample collage (optional)."""
        return None

    def preview_batch(self) -> dict[str, Any]:
        """The first ``preview.n`` samples of the training data (``self.dataset_ref``, set by :meth:`build`),
        collated: what the previews show."""
        from .data import collate, float_images

        n = min(self.cfg.preview.n, len(self.dataset_ref))
        return float_images(collate([self.dataset_ref[i] for i in range(n)]))

    # What the task trains from; datasets_tools.training_data builds that dataset from the config, and the
    # trainer is handed it. "store": the Zarr latent store of data.store with those of store_fields it holds
    # (required_fields must be among them); "images": the images of data.images (images_why completes the
    # error when data.images is not set).
    trains_from: ClassVar[Literal["store", "images"]] = "store"
    store_fields: ClassVar[tuple[str, ...]] = ("latent", "clip_text", "clip_text_pooled")
    required_fields: ClassVar[tuple[str, ...]] = ("latent",)
    images_why: ClassVar[str] = ""


def load_trainable_model(family: str, cfg: TrainConfig, source: str) -> nn.Module:
    """The model to fine-tune: from ``model.checkpoint`` (config from the file, else the preset), or built
    from ``model.preset``/``model.config`` with the official training initialisation; fp32, train mode.
    ``family`` is the model family of :mod:`codec.presets` (``stage_b`` …); ``model.preset: tiny`` means the
    family's tiny preset."""
    m = cfg.model
    preset: dict[str, Any] = {}
    if m.preset is not None:
        name = f"{family}_tiny" if m.preset == "tiny" else m.preset
        if name not in list_presets(family):
            raise ConfigError(f"{source}: model.preset {m.preset!r} is not one of "
                              f"{list_presets(family) + ['tiny']}.")
        preset = get_preset(name).kwargs()
    preset.update(m.config)
    if m.checkpoint:
        model, _ = W.load_configured(FAMILIES[family], m.checkpoint, preset or None, torch.float32, "cpu")
    else:
        if not preset:
            raise ConfigError(f"{source}: give model.checkpoint (weights to fine-tune) or model.preset to train "
                              "from scratch.")
        model = FAMILIES[family](**preset)
        if hasattr(model, "init_weights"):
            model.init_weights()
    if m.dropout is not None:
        for sub in model.modules():
            if isinstance(sub, nn.Dropout):
                sub.p = m.dropout
            if hasattr(sub, "dropout") and isinstance(getattr(sub, "dropout"), float):
                sub.dropout = m.dropout
    return model.train().requires_grad_(True)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (fp32 for floats)."""
    return dict(W.iter_tensors(W.read_header(path), torch.float32))


def model_config(model: nn.Module) -> dict[str, Any]:
    """The constructor arguments recorded by our models (``model.config``: a dataclass or a dict)."""
    return dict(model.config) if isinstance(model.config, dict) else asdict(model.config)
