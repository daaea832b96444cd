"""Training: one loop for every task, with checkpoints and exact resume, DDP/FSDP, EMA, validated configs, logs
and previews; and the tasks that train the codec itself (``stage-a``: Stage A; ``codec``: the encoder with Stage
B; ``stage-b``: Stage B fine-tuning). The generation tasks (Stage C, LoRA, ControlNet) are in
:mod:`codec.generation.training`, built on this package.

Entry point :func:`train` (handed its dataset); CLI ``cascade train TASK CONFIG.yaml``. Config reference:
:mod:`.config`; what a task supplies: :mod:`.task`; annotated example configs: ``examples/``.
"""

from .config import ConfigError, TrainConfig
from .run import TASKS, task_class, train
from .task import Task

__all__ = ["ConfigError", "TrainConfig", "TASKS", "Task", "task_class", "train"]
