"""Ctrl-C that always stops a job, also while DataLoader worker processes start.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be, and a few places
lose it: code that catches it or clears the error it raised (C extensions, finalisers), and DataLoader workers,
which a terminal's Ctrl-C reaches too and which, forked in the middle of their start-up, print their own traceback
or exit and make the main process fail with "worker exited unexpectedly". So:

* :func:`handle_interrupts` (the command line wraps every command in it) installs a SIGINT handler that raises
  ``KeyboardInterrupt`` *and* remembers that the user asked to stop; long loops call :func:`check_interrupted` at
  every batch, which raises it again if the first one was lost.
* :func:`start_workers` creates a DataLoader's iterator, which forks its workers, with SIGINT blocked, so each
  worker is born unable to take it; :func:`ignore_interrupts` (its ``worker_init_fn``) then ignores it for good and
  only the main process acts on Ctrl-C. A SIGINT that arrives meanwhile waits and is delivered to the main process
  when the block ends, never dropped.

The state lives in the handler object installed for SIGINT, the process's own record of it; nothing changes for
Python callers that never call :func:`handle_interrupts`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Any, Iterator

__all__ = ["InterruptHandler", "check_interrupted", "handle_interrupts", "ignore_interrupts", "start_workers"]


class InterruptHandler:
    """The SIGINT handler: raise ``KeyboardInterrupt`` and remember that the user asked to stop (``tripped``).

    While ``deferred`` (set by :func:`start_workers`) it only remembers, so that a start-up that must not be cut in
    half is not; :func:`check_interrupted` raises afterwards."""

    def __init__(self) -> None:
        self.tripped = False
        self.deferred = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.tripped = True
        if not self.deferred:
            raise KeyboardInterrupt


@contextlib.contextmanager
def handle_interrupts() -> Iterator[None]:
    """Install an :class:`InterruptHandler` for SIGINT for the duration (main thread only; elsewhere Python
    cannot install handlers and this does nothing); the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, InterruptHandler())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when Ctrl-C was pressed under :func:`handle_interrupts`, even if the exception
    the handler raised then was swallowed on its way up. Cheap: call it at every batch."""
    handler = signal.getsignal(signal.SIGINT)
    if isinstance(handler, InterruptHandler) and handler.tripped:
        raise KeyboardInterrupt


def ignore_interrupts(worker_id: int = 0) -> None:
    """``worker_init_fn`` of a DataLoader: this worker ignores SIGINT (the main process stops the job and its
    workers), then lifts the block it was started with (:func:`start_workers`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_workers(loader: Any) -> Iterator[Any]:
    """``iter(loader)``, with SIGINT blocked in this thread while the iterator starts the loader's worker processes:
    they inherit the block and keep it until :func:`ignore_interrupts` (the loader's ``worker_init_fn``) ignores
    SIGINT. A Ctrl-C meanwhile (delivered to another thread of this process, or held until the block ends) does not
    cut the start-up in half under :func:`handle_interrupts`: it is raised here once the workers are up, so that
    the iterator exists to shut them down."""
    if threading.current_thread() is not threading.main_thread():
        return iter(loader)
    handler = signal.getsignal(signal.SIGINT)
    handler = handler if isinstance(handler, InterruptHandler) else None
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    if handler is not None:
        handler.deferred = True
    try:
        batches = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if handler is not None:
            handler.deferred = False
    check_interrupted()
    return batches
