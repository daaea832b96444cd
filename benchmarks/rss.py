"""Resident-memory readings shared by the benchmarks."""

from __future__ import annotations

import resource
from pathlib import Path


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or ``None`` where ``/proc`` is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak RSS.

    ``VmHWM`` (``/proc/self/status``) starts afresh at exec, unlike ``ru_maxrss``, which Linux
    carries over from the parent across fork+exec (a spawned worker would report its parent's
    peak if that was higher). Falls back to ``ru_maxrss`` where ``/proc`` is unavailable.
    """
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int | None:
    """This process's current RSS (``VmRSS``), or ``None`` where ``/proc`` is unavailable."""
    return _status_bytes("VmRSS")
