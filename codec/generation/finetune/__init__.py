"""Fine-tuning: one training loop for every task (Stage C, LoRA + new tokens, Stage B, ControlNet later).

Entry point :func:`train`; CLI ``cascade train TASK CONFIG.yaml``. Config reference:
:mod:`.config`; what a task supplies: :mod:`.task`.
"""

from .config import ConfigError, TrainConfig
from .run import TASKS, task_class, train
from .task import Task

__all__ = ["ConfigError", "TrainConfig", "TASKS", "Task", "task_class", "train"]
