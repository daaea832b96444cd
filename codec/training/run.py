"""Entry point: ``train(task, config, dataset)`` — used by ``cascade train TASK CONFIG.yaml`` and by tests.

``task`` is a :class:`~.task.Task` subclass; a registry such as :data:`TASKS` names tasks (``module:Class``,
imported lazily by :func:`task_class`), so a new task only needs a subclass and a line in one. The trainer is
handed its data: a dataset, or a function that builds it from the task's config (``cascade train`` passes
``datasets_tools.training_data.training_dataset``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping

from ..errors import UsageError
from ..files import check_output
from .checkpoint import Position
from .config import ConfigError, load_config, read_yaml
from .task import Task

# The tasks that train the codec itself; codec.generation.training registers its own (Stage C, LoRA, ControlNet)
# and `cascade train` looks a name up in both.
TASKS: dict[str, str] = {
    "stage-b": "codec.training.stage_b_task:StageBTask",
    "stage-a": "codec.training.codec_tasks:StageATask",
    "encoder": "codec.training.codec_tasks:EncoderTask",
    "codec": "codec.training.codec_tasks:CodecTask",
    "decoder": "codec.training.codec_tasks:DecoderTask",
    "end-to-end": "codec.training.codec_tasks:EndToEndTask",
}


def task_class(name: str, tasks: Mapping[str, str] = TASKS) -> type[Task]:
    """The task class registered under ``name`` in ``tasks`` (``name → "module:Class"``)."""
    if name not in tasks:
        raise ConfigError(f"unknown training task {name!r}; choose one of {', '.join(tasks)}.")
    module, _, cls = tasks[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise ConfigError(f"training task {name!r} is not available in this version ({tasks[name]} is missing)."
                          ) from None


def train(task: type[Task], config: str | os.PathLike | dict[str, Any], dataset: Any | Callable[[Task], Any],
          hook: Callable[[int], None] | None = None, echo: Callable[[str], None] | None = print,
          device: str | None = None) -> Position:
    """Train ``task`` (a :class:`~.task.Task` subclass) with ``config`` (a YAML path or a dict) until
    ``max_steps``; resumes from the checkpoint in ``output_dir`` when there is one.

    ``dataset`` is the training data (a map-style dataset of item dicts with ``bucket_indices()``), or a
    function of the task, called once its config is read (in every process), that returns them.
    """
    from . import distributed as D
    from .loop import Trainer

    source = str(config) if not isinstance(config, dict) else "config"
    data = read_yaml(config) if not isinstance(config, dict) else dict(config)
    if data.get("task") not in (None, task.name):
        raise ConfigError(f"{source}: the config is for task {data['task']!r}, not {task.name!r}.")
    cfg, section = load_config(data, task.section, task.section_model, source)
    try:  # before any model is built
        check_output(cfg.output_dir, folder=True)
    except UsageError as e:
        raise ConfigError(f"{source}: output_dir: {e}") from None
    d = D.setup(device)
    try:
        job = task(cfg, section, d, source)
        trainer = Trainer(job, cfg, d, dataset(job) if callable(dataset) else dataset, source,
                          echo=echo if d.main else None)
        position = trainer.run(hook)
    except BaseException:
        D.teardown(d, clean=False)
        raise
    D.teardown(d)
    return position
