"""Helper for tests/test_interrupts.py: ``interrupt_worker.py MOMENT ARGS…`` runs ``cascade ARGS…`` and presses
Ctrl-C (SIGINT to the whole process group, as a terminal does) at exactly MOMENT:

* ``worker-start``: right after the first DataLoader worker process has started, while the next one starts;
* ``batch-N``: as the job takes its N-th batch (encode-dataset: the N-th batch into the encoder; train: the N-th
  training batch);
* ``swallowed-start``, ``swallowed-batch-N``: just before the DataLoader starts, or at the N-th batch, inside code
  that catches the ``KeyboardInterrupt`` and goes on (as a library may): only the project's own record of the
  Ctrl-C can stop the job then.

It prints ``ctrl-c at <time.time()>`` on stderr when it presses, so that the test can time the exit.
"""

from __future__ import annotations

import multiprocessing.process
import os
import signal
import sys
import time
from typing import Any, Callable


def press() -> None:
    """Ctrl-C as a terminal sends it: SIGINT to every process of this process group."""
    print(f"ctrl-c at {time.time()}", file=sys.stderr, flush=True)
    os.killpg(0, signal.SIGINT)


def lost() -> None:
    """Ctrl-C whose ``KeyboardInterrupt`` never reaches the command: caught here, and the work goes on."""
    try:
        press()
        time.sleep(1)  # the handler runs at once; the sleep only makes sure it has
    except KeyboardInterrupt:
        pass


def at_call(module: Any, name: str, n: int, before: Callable[[], None]) -> None:
    """Run ``before()`` as ``module.name`` is called the ``n``-th time."""
    real, calls = getattr(module, name), []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == n:
            before()
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def main() -> None:
    """Arrange the Ctrl-C, then run the command line."""
    moment, args = sys.argv[1], sys.argv[2:]
    import codec.interrupts
    import codec.training.data
    import codec.training.loop
    import datasets_tools.encode

    if moment == "worker-start":
        real_start = multiprocessing.process.BaseProcess.start
        started = []

        def start(self: Any) -> None:
            real_start(self)
            started.append(self)
            if len(started) == 1:
                press()

        multiprocessing.process.BaseProcess.start = start
    elif moment == "swallowed-start":
        at_call(codec.interrupts, "start_workers", 1, lost)  # encode-dataset imports it when it runs
        at_call(codec.training.data, "start_workers", 1, lost)
    elif moment.startswith(("batch-", "swallowed-batch-")):
        n, action = int(moment.rsplit("-", 1)[1]), lost if moment.startswith("swallowed") else press
        at_call(datasets_tools.encode, "_encode_arrays", n, action)
        at_call(codec.training.loop, "float_images", n, action)
    else:
        raise SystemExit(f"unknown moment {moment!r}")
    from codec.cli import main as cascade

    cascade(args, prog_name="cascade")


if __name__ == "__main__":
    main()
