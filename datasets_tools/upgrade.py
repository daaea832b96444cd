"""Upgrading a latent store in place from format version 1 to 2: the Python API behind ``cascade upgrade-store``.

Version 1 kept the string columns (``id``, ``source``, ``caption`` of each bucket; ``id``, ``source``,
``reason`` of the ``errors`` and ``warnings`` tables) as zarr-python's ``string`` data type; version 2
keeps them as core Zarr v3 arrays (:mod:`datasets_tools.string_columns`). Nothing else changes.

Resumable: the root attribute ``upgrade`` (``{"from": 1, "to": 2, "verified": ["b768x768/id", …]}``)
is set first, so every reader refuses the half-upgraded store with a sentence naming this command.
Each column is converted, read back and compared with the version-1 array, listed as verified, and
only then is its version-1 array deleted. A column not yet verified is converted again from scratch;
a verified one is never converted again (its version-1 array may be half deleted). The last step
writes the root attributes with ``format_version`` 2 and without ``upgrade`` in one atomic write.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codec.progress import progress_bar

from . import string_columns
from .store import (
    FORMAT_VERSION,
    STRING_ARRAYS,
    TABLE_COLUMNS,
    TABLES,
    UPGRADE_ATTR,
    LatentStore,
    StoreError,
    StoreHook,
)

UPGRADES_FROM = 1  # the only older version


@dataclass
class UpgradeSummary:
    """What :func:`upgrade_store` did."""

    url: str
    from_version: int
    columns: int  # string columns converted in this run

    def line(self) -> str:
        """One line for the user."""
        if self.from_version == FORMAT_VERSION:
            return f"{self.url} is already format version {FORMAT_VERSION}; nothing to do"
        return (f"upgraded {self.url} from format version {self.from_version} to {FORMAT_VERSION} "
                f"({self.columns} string column(s) converted)")


def string_column_keys(store: LatentStore, verified: list[str]) -> list[str]:
    """``"group/column"`` of every version-1 string column still to convert or to delete: those whose array
    exists, plus the ``verified`` ones (whose version-1 array may be half deleted)."""
    keys = []
    for group, columns in ([(b, STRING_ARRAYS) for b in store.bucket_names()]
                           + [(t, TABLE_COLUMNS) for t in TABLES if t in store.group.group_keys()]):
        present = set(store.group[group].array_keys())
        keys += [f"{group}/{c}" for c in columns if c in present or f"{group}/{c}" in verified]
    return keys


def column_units(store: LatentStore, key: str) -> int:
    """Work units of converting column ``key``: a bucket column's units of S rows, or 1 for a table's."""
    group, column = key.split("/")
    return -(-store.group[group][column].shape[0] // store.shard_size) if group not in TABLES else 1


def convert_column(store: LatentStore, key: str, advance: Callable[[int], Any],
                   hook: StoreHook | None = None) -> int:
    """Write the version-2 arrays of the version-1 column ``key`` (from scratch) and check that they read back
    equal to it; returns the number of strings. A bucket column is written unit by unit, each unit into its own
    region, exactly as an encoding run writes it."""
    group, column = key.split("/")
    g = store.group[group]
    old = g[column]
    values = [str(v) for v in old[:].tolist()] if old.shape[0] else []
    if group in TABLES:
        string_columns.write_column(g, column, values)
        advance(1)
    else:
        S = store.shard_size
        n_units = -(-len(values) // S)
        string_columns.create_column(g, column, len(values), n_units * string_columns.REGION_BYTES, shard_rows=S,
                                     overwrite=True)
        for k in range(n_units):
            string_columns.write_rows(g, column, k * S, k * string_columns.REGION_BYTES, values[k * S:(k + 1) * S])
            advance(1)
            if hook is not None:
                hook(f"upgrade {key} unit {k}")
    if string_columns.read_column(g, column) != values:
        raise StoreError(f"{store.location.url}: the version-2 copy of {key} does not read back equal to the "
                         "version-1 array, which is kept; the storage may be failing. Check it and run "
                         "`cascade upgrade-store` again.")
    return len(values)


def upgrade_store(url: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                  progress: bool | None = None, hook: StoreHook | None = None) -> UpgradeSummary:
    """Convert the store at ``url`` in place to the current format version (see the module docstring).

    Killed at any moment and run again, it finishes with the same store. A store already at the current
    version is left untouched; foreign and newer stores are refused (:class:`StoreError`). ``hook`` is told
    each point passed (``"upgrade KEY unit K"``, ``"upgrade KEY verified"``, ``"upgrade KEY removed"``).
    """
    store = LatentStore.open(url, storage_options, mode="r+", upgrading=True)
    attrs = store.attrs
    url = store.location.url
    if store.format_version == FORMAT_VERSION and UPGRADE_ATTR not in attrs:
        return UpgradeSummary(url, FORMAT_VERSION, 0)
    if store.format_version != UPGRADES_FROM:
        raise StoreError(f"{url} has format version {store.format_version}; `cascade upgrade-store` converts "
                         f"version {UPGRADES_FROM} stores only.")
    state = attrs.get(UPGRADE_ATTR) or {"from": UPGRADES_FROM, "to": FORMAT_VERSION, "verified": []}
    store.group.attrs.update({UPGRADE_ATTR: state})  # from here on, readers refuse the store until the end
    keys = string_column_keys(store, state["verified"])
    todo = [k for k in keys if k not in state["verified"]]
    bar = progress_bar(sum(column_units(store, k) for k in todo), "upgrade-store", unit="unit", enabled=progress)
    try:
        for key in keys:
            if key not in state["verified"]:
                convert_column(store, key, bar.update, hook)
                state["verified"].append(key)
                store.group.attrs.update({UPGRADE_ATTR: state})
                if hook is not None:
                    hook(f"upgrade {key} verified")
            group, column = key.split("/")
            del store.group[group][column]  # idempotent: also removes what a killed deletion left
            if hook is not None:
                hook(f"upgrade {key} removed")
    finally:
        bar.close()
    final = {k: v for k, v in store.attrs.items() if k != UPGRADE_ATTR}
    store.group.attrs.put({**final, "format_version": FORMAT_VERSION, "upgraded_from": UPGRADES_FROM})
    return UpgradeSummary(url, UPGRADES_FROM, len(todo))
