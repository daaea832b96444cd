"""Entry point: ``train(task, config)`` — used by ``cascade train TASK CONFIG.yaml`` and by tests.

Tasks are looked up by name in :data:`TASKS` (``module:Class``), imported lazily; a new task
(e.g. ControlNet) only needs a :class:`~.task.Task` subclass and a line here.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from .checkpoint import Position
from .config import ConfigError, load_config, read_yaml

TASKS: dict[str, str] = {
    "stage-c": "codec.generation.finetune.stage_c_task:StageCTask",
    "lora": "codec.generation.finetune.lora_task:LoraTask",
    "stage-b": "codec.generation.finetune.stage_b_task:StageBTask",
    "controlnet": "codec.generation.finetune.controlnet_task:ControlNetTrainingTask",
    "stage-a": "codec.generation.finetune.codec_tasks:StageATask",
    "codec": "codec.generation.finetune.codec_tasks:CodecTask",
}


def task_class(name: str) -> type:
    """The task class registered under ``name``."""
    if name not in TASKS:
        raise ConfigError(f"unknown training task {name!r}; choose one of {', '.join(TASKS)}.")
    module, _, cls = TASKS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise ConfigError(f"training task {name!r} is not available in this version ({TASKS[name]} is missing)."
                          ) from None


def train(task: str, config: str | os.PathLike | dict[str, Any], dataset: Any = None,
          hook: Callable[[int], None] | None = None, echo: Callable[[str], None] | None = print,
          device: str | None = None) -> Position:
    """Train ``task`` with ``config`` (a YAML path or a dict) until ``max_steps``; resumes from the
    checkpoint in ``output_dir`` when there is one. ``dataset`` replaces ``data.store`` (tests)."""
    from . import distributed as D
    from .loop import Trainer

    source = str(config) if not isinstance(config, dict) else "config"
    data = read_yaml(config) if not isinstance(config, dict) else dict(config)
    if data.get("task") not in (None, task):
        raise ConfigError(f"{source}: the config is for task {data['task']!r}, not {task!r}.")
    cls = task_class(task)
    cfg, section = load_config(data, cls.section, cls.section_model, source)
    d = D.setup(device)
    try:
        job = cls(cfg, section, d, source)
        trainer = Trainer(job, cfg, d, dataset if dataset is not None else job.dataset(), source,
                          echo=echo if d.main else None)
        position = trainer.run(hook)
    except BaseException:
        D.teardown(d, clean=False)
        raise
    D.teardown(d)
    return position
