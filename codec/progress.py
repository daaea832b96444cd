"""The one progress-bar policy: tqdm with rate and ETA, hidden when the output is not a terminal or when asked."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool | None = None, initial: int = 0,
                 **kwargs: Any):
    """A tqdm bar over ``total`` units named ``unit``, showing rate and ETA.

    ``enabled``: ``None`` shows it only on a terminal (tqdm's ``disable=None``), ``False`` never, ``True`` always.
    Other keyword arguments go to tqdm (e.g. ``unit_scale``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                disable=None if enabled is None else not enabled, **kwargs)
