"""Helper for tests/test_finetune_distributed.py, run under ``torchrun``: ``cascade train`` that is killed.

``train_killed_worker.py TASK CONFIG.yaml STEP``: trains ``TASK`` with ``CONFIG.yaml``; right after update
``STEP``, rank 0 sends itself SIGKILL (no clean-up, no flush: what an out-of-memory kill or a pre-empted node
does). ``torchrun`` then stops the other processes and exits non-zero.
"""

from __future__ import annotations

import os
import signal
import sys

from codec.generation.training import TASKS as GENERATION_TASKS
from codec.training import TASKS, task_class, train
from datasets_tools.training_data import training_dataset


def main() -> None:
    """Train until update ``STEP``, then die."""
    task, config, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))

    def die(done: int) -> None:
        if done == step and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    train(task_class(task, {**TASKS, **GENERATION_TASKS}), config, training_dataset, hook=die, echo=None)
    sys.exit(3)  # not reached when STEP <= max_steps: the test sees a run that was not killed


if __name__ == "__main__":
    main()
