"""Writing files so that a killed process never leaves a half-written one under the final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
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


def check_output(path: str | os.PathLike, folder: bool = False) -> Path:
    """Make sure ``path`` can be written before any work starts: no file where a folder must be, no folder where
    the file goes (``folder=False``) and a writable place. Returns it; raises a :class:`UsageError` otherwise."""
    from .errors import UsageError

    p = Path(path).expanduser()
    for parent in [*reversed(p.parents)]:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{p}: cannot write there, {parent} is a file, not a folder")
    if p.exists() and p.is_dir() != folder:
        raise UsageError(f"{p} is a {'file' if folder else 'folder'}; give {'a folder' if folder else 'a file name'}")
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not os.access(existing, os.W_OK):
        raise UsageError(f"{p}: cannot write there ({existing} is not writable); choose another place")
    where = existing if existing.is_dir() else existing.parent
    try:  # os.access says yes to root everywhere, and knows nothing of /proc, /sys or a full quota: try it
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise UsageError(f"{p}: cannot write there (a file cannot be created in {where}: {e.strerror}); choose "
                         "another place") from None
    return p


def check_input(path: str | os.PathLike, hint: str = "") -> Path:
    """``path`` if it is an existing file; a sentence for a missing one or a folder (``hint``: the command for
    folders), before any work starts."""
    from .errors import MissingInputError

    p = Path(path).expanduser()
    if p.is_dir():
        raise MissingInputError(f"{p} is a folder{'; ' + hint if hint else ''}")
    if not p.is_file():
        raise MissingInputError(f"{p}: no such file")
    return p
