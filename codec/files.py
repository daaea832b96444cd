"""Writing files so that a killed process never leaves a half-written one under the final name."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def partial_path(path: str | os.PathLike) -> Path:
    """The temporary name a file is written under before it takes its final name: ``name.partial.ext``.

    The extension is kept so that libraries that choose a format by it (PIL, numpy) still do."""
    p = Path(path)
    return p.with_name(f"{p.stem}.partial{p.suffix}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error the file is given ``mode``
    (default: what a new file gets under the process's umask, e.g. 0644, whatever library wrote it) and renamed
    to ``path`` in one step (``os.replace``), otherwise it is removed. Parent folders are created."""
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
