"""Training configuration: YAML files validated into typed objects, with one-sentence errors.

The common part (:class:`TrainConfig`) is shared by every task; a task adds its own
section (``lora:``, ``stage_b:``, …) described by its own pydantic model (``Task.section`` and
``Task.section_model``). Unknown keys are errors (with a "did you mean"), so a typo never
silently falls back to a default. Defaults are the official recipe (official.md §13).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UsageError


class ConfigError(UsageError):
    """The training config is invalid; the message names the file, the key and the fix."""


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which model to train and where its weights come from."""

    checkpoint: Optional[str] = Field(None, description="safetensors file to start from (official or ours)")
    preset: Optional[str] = Field(None, description="named architecture when the file has no config: "
                                                   "stage_c_lite, stage_c_large, stage_b_lite, stage_b_large, tiny")
    config: dict[str, Any] = Field(default_factory=dict, description="constructor arguments overriding the preset")
    dropout: Optional[float] = Field(None, ge=0, le=1, description="override the model's dropout (official: 0.1)")


class DataSection(Section):
    """Where the training data come from: a latent store, or images for tasks that need pixels (controlnet)."""

    store: Optional[str] = Field(None, description="Zarr latent store written by `cascade encode-dataset` "
                                                   "(stage-c, lora, stage-b)")
    images: Optional[str] = Field(None, description="image source for tasks that need pixels (controlnet): a "
                                                    "folder, a .csv/.jsonl manifest or .tar shards")
    image_size: int = Field(768, ge=32, multiple_of=32,
                            description="images: short side to this size, then a centre square crop")
    min_size: int = Field(0, ge=0, description="images: skip (and list in OUTPUT_DIR/skipped.jsonl) those with a "
                                               "side below this (official ControlNet recipe: 768)")
    buckets: Optional[list[str]] = None
    num_workers: int = Field(0, ge=0)
    cache: bool = Field(False, description="images: decode them all once into memory as uint8 and read batches from "
                                           "there in the training process (num_workers unused); for image sets "
                                           "that fit in memory, on a GPU, where decoding and passing float images "
                                           "between worker processes otherwise sets the pace")
    shard_cache: int = Field(0, ge=0, description="store on an object store (s3://, gs://, …): read whole shards "
                                                   "with one request each, keep this many per worker decoded in "
                                                   "memory, and batch each epoch shard by shard (shards shuffled, "
                                                   "rows shuffled within a shard, one shard per loader worker) so "
                                                   "each shard is fetched about once per epoch. 0: sample by sample "
                                                   "in a fully random order (local stores are fast either way)")
    text: Literal["auto", "stored", "encoder"] = Field(
        "auto", description="text conditions: stored embeddings (when the store has them), or the text encoder")
    shuffle: bool = True


class OptimSection(Section):
    """AdamW and the learning-rate schedule (official: lr 1e-4, torch AdamW defaults, warm-up 1, clip 1)."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_updates: int = Field(1, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: Optional[float] = Field(1.0, gt=0)


class ConditionSection(Section):
    """Condition dropout as in the official training (5 % empty caption, 10 % CLIP image embedding)."""

    caption_dropout: float = Field(0.05, ge=0, le=1)
    image_embed_p: float = Field(0.1, ge=0, le=1)


class EmaSection(Section):
    """Exponential moving average of the trained weights (official: β=0 copy until ``start``)."""

    beta: float = Field(0.9, ge=0, lt=1)
    start: int = Field(5000, ge=0)
    every: int = Field(100, ge=1)


class CheckpointSection(Section):
    """When to save (resumable checkpoint) and keep (weights-only snapshots)."""

    save_every: int = Field(100, ge=1)
    keep_every: int = Field(0, ge=0, description="also keep a weights-only copy every N updates (0: never)")


class LogSection(Section):
    """Console and JSONL logging."""

    every: int = Field(10, ge=1)


class PreviewSection(Section):
    """Sample collages at intervals (Stage C: through the Previewer)."""

    every: int = Field(0, ge=0, description="updates between collages (0: never)")
    n: int = Field(4, ge=1)
    steps: int = Field(20, ge=1)
    cfg: float = 4.0
    shift: float = 2.0
    captions: Optional[list[str]] = None


class DistributedSection(Section):
    """How several processes (torchrun) share the work."""

    strategy: Literal["ddp", "fsdp"] = "ddp"


class TrainConfig(Section):
    """Everything shared by the training tasks; the task's own section is validated separately."""

    output_dir: str
    weights: Optional[str] = Field(None, description="folder with previewer/effnet/stage_a files and the text "
                                                     "encoder (text_encoder/, tokenizer/)")
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    batch_size: int = Field(ge=1, description="global batch per optimiser update (all processes together)")
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int = Field(ge=1, description="optimiser updates")
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    loss_weight: Literal["p2", "adaptive"] = "p2"
    prediction: Literal["epsilon", "v"] = Field(
        "epsilon", description="what the denoiser learns to output: epsilon (official) or v = a·ε − b·x0 (the "
                               "built-in mini codec: its x0 at high noise is a regression, not (x − b·ε)/a with a≈0.01); "
                               "record it with the weights (sampling metadata) so that the sampler reads it")
    offset_noise: float = Field(0.0, ge=0)
    t_range: tuple[float, float] = Field(
        (0.0, 1.0), description="noise levels t (0 clean, 1 pure noise) drawn uniformly in training; official (0, 1). "
                                "(1, 1) trains only the step from pure noise, which is all a one-step sampler runs "
                                "(the built-in mini codec)")
    optim: OptimSection = Field(default_factory=OptimSection)
    conditions: ConditionSection = Field(default_factory=ConditionSection)
    ema: Optional[EmaSection] = None
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    log: LogSection = Field(default_factory=LogSection)
    preview: PreviewSection = Field(default_factory=PreviewSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        lo, hi = self.t_range
        if not 0 <= lo <= hi <= 1:
            raise UsageError(f"t_range {list(self.t_range)} must satisfy 0 <= low <= high <= 1")
        if self.batch_size % self.grad_accum_steps:
            raise UsageError(f"batch_size {self.batch_size} must be a multiple of grad_accum_steps "
                             f"{self.grad_accum_steps}")
        return self

    def micro_batch(self, world_size: int) -> int:
        """Samples per process per forward pass: ``batch_size / (world_size · grad_accum_steps)``."""
        n = self.batch_size // self.grad_accum_steps
        if n % world_size:
            raise ConfigError(f"batch_size {self.batch_size} / grad_accum_steps {self.grad_accum_steps} = {n} is not "
                              f"divisible by the {world_size} processes; choose a batch_size that is.")
        return n // world_size


def _format(err: dict[str, Any], model: type[BaseModel], prefix: str) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join([prefix] + loc if prefix else loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _known_keys(model, [p for p in err["loc"][:-1]])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else (f"; allowed: {', '.join(sorted(known))}" if known else "")
        return f"unknown key {where!r}{hint}"
    if err["type"] == "missing":
        return f"{where!r} is required"
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    return f"{where}: {err['msg']}{shown}"


def _known_keys(model: type[BaseModel], loc: list) -> list[str]:
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        sub = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def validate(model: type[BaseModel], data: Any, source: str, prefix: str = "") -> BaseModel:
    """Validate ``data`` against ``model``; raise :class:`ConfigError` listing every problem."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as e:
        problems = [_format(err, model, prefix) for err in e.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems) + ". Fix the config and run again.") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML mapping with a clear error for a missing file or bad syntax."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the YAML config file (examples: configs/mini/*.yaml).")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; give the YAML config file.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where} ({getattr(e, 'problem', e)}).") from None
    if data is None:
        raise ConfigError(f"{path} is empty; a config needs at least output_dir, data, batch_size and max_steps "
                          "(examples: configs/mini/*.yaml).")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping (key: value lines), got {type(data).__name__}.")
    return data


def load_config(data: dict[str, Any], task_section: str | None, section_model: type[BaseModel] | None,
                source: str) -> tuple[TrainConfig, BaseModel | None]:
    """Split off the task's section and validate both parts; other tasks' sections are rejected."""
    data = dict(data)
    data.pop("task", None)
    section_data = data.pop(task_section, None) if task_section else None
    common = validate(TrainConfig, data, source)
    section = validate(section_model, section_data or {}, source, task_section) if section_model else None
    return common, section
