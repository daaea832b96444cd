"""String columns in core Zarr v3 data types (store format version 2; see ``FORMAT.md``).

A column ``name`` of N strings is two arrays: ``{name}_bytes``, uint8, the UTF-8 bytes of the
strings, and ``{name}_offsets``, int64 ``(N, 2)``, the ``(start, end)`` of string i in
``{name}_bytes``, so any Zarr v3 reader gets string i as
``bytes(name_bytes[start:end]).decode("utf-8")``. ``""`` is stored as ``(0, 0)``, which is also what rows
never written read.

Bucket columns are written unit by unit by concurrent writers, so each unit k owns a fixed
region ``[k·REGION_BYTES, (k+1)·REGION_BYTES)`` of ``{name}_bytes`` made of whole chunks: writers
never share a storage object, and chunks nobody wrote are simply absent. Tables (written
once, by one process) have one region starting at 0, sized to their bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

REGION_BYTES = 1 << 32  # byte capacity of one unit's region: effectively unbounded, costs nothing until written
CHUNK_BYTES = 1 << 16   # chunk of a bytes array; divides REGION_BYTES
TABLE_CHUNK_ROWS = 1 << 14


def offsets_name(column: str) -> str:
    """Name of a column's ``(N, 2)`` int64 array of ``(start, end)`` byte offsets."""
    return f"{column}_offsets"


def bytes_name(column: str) -> str:
    """Name of a column's uint8 array of UTF-8 bytes."""
    return f"{column}_bytes"


def is_bytes_name(name: str) -> bool:
    """Whether array ``name`` holds a string column's bytes (its length counts bytes, not rows)."""
    return name.endswith("_bytes")


def encode_strings(strings: Sequence[str], base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets (n, 2) int64, data uint8)``: the strings' UTF-8 bytes back to back, string i at
    ``data[offsets[i,0]-base : offsets[i,1]-base]`` (offsets count from ``base``, where ``data`` is stored);
    ``""`` gets ``(0, 0)``."""
    encoded = [s.encode("utf-8") for s in strings]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    ends = np.cumsum(lengths) + base
    offsets = np.stack([ends - lengths, ends], axis=1) * (lengths > 0)[:, None]  # "" is (0, 0), as never-written rows
    return offsets, np.frombuffer(b"".join(encoded), dtype=np.uint8)


def decode_strings(offsets: np.ndarray, data: np.ndarray | bytes, base: int = 0) -> list[str]:
    """The strings at ``offsets`` (``(n, 2)`` absolute) in ``data``, which holds the bytes from position ``base``."""
    buf = bytes(data)
    return [buf[s - base:e - base].decode("utf-8") if e > s else "" for s, e in np.asarray(offsets, np.int64).tolist()]


def create_column(group: Any, column: str, rows: int, byte_length: int, shard_rows: int | None = None,
                  overwrite: bool = False) -> None:
    """Create a column's two arrays in zarr ``group``: ``rows`` offsets (shards of ``shard_rows`` rows when given,
    like the other per-row arrays of a bucket; else chunks of up to 16384 rows) and ``byte_length`` bytes."""
    if shard_rows:
        layout: dict[str, Any] = {"shards": (shard_rows, 2), "chunks": (shard_rows, 2)}
    else:
        layout = {"chunks": (max(1, min(rows, TABLE_CHUNK_ROWS)), 2)}
    group.create_array(offsets_name(column), shape=(rows, 2), dtype="int64", fill_value=0, overwrite=overwrite,
                       **layout)
    group.create_array(bytes_name(column), shape=(byte_length,), chunks=(CHUNK_BYTES,), dtype="uint8",
                       fill_value=0, overwrite=overwrite)


def write_rows(group: Any, column: str, first_row: int, base: int, strings: Sequence[str]) -> None:
    """Write ``strings`` into rows ``first_row…`` of ``column``, their bytes from position ``base`` (a chunk
    boundary) on. The bytes are padded to whole chunks, so the write touches no chunk beyond its own."""
    offsets, data = encode_strings(strings, base)
    group[offsets_name(column)][first_row:first_row + len(strings)] = offsets
    if len(data):
        target = group[bytes_name(column)]
        end = min(base + -(-len(data) // CHUNK_BYTES) * CHUNK_BYTES, target.shape[0])
        target[base:end] = np.pad(data, (0, end - base - len(data)))


def write_column(group: Any, column: str, strings: Sequence[str]) -> None:
    """(Re)create ``column`` holding exactly ``strings`` (tables: one region from byte 0)."""
    _, data = encode_strings(strings)
    create_column(group, column, len(strings), len(data), overwrite=True)
    write_rows(group, column, 0, 0, strings)


def read_column(group: Any, column: str, rows: np.ndarray | None = None, threads: int = 8) -> list[str]:
    """Strings of ``column`` at ``rows`` (all rows by default). One read of the bytes per unit region
    (in ``threads`` threads), never the (mostly empty) whole bytes array."""
    offsets = group[offsets_name(column)][...] if group[offsets_name(column)].shape[0] else np.zeros((0, 2), np.int64)
    if rows is not None:
        offsets = offsets[np.asarray(rows, dtype=np.int64)]
    used = offsets[:, 1] > offsets[:, 0]
    regions = np.unique(offsets[used, 0] // REGION_BYTES)
    data = group[bytes_name(column)]

    def region_strings(region: int) -> tuple[np.ndarray, list[str]]:
        sel = np.nonzero(used & (offsets[:, 0] // REGION_BYTES == region))[0]
        lo, hi = int(offsets[sel, 0].min()), int(offsets[sel, 1].max())
        return sel, decode_strings(offsets[sel], data[lo:hi], lo)

    out = [""] * len(offsets)
    with ThreadPoolExecutor(max(1, min(threads, len(regions)))) as pool:
        for sel, strings in pool.map(region_strings, regions.tolist()):
            for i, s in zip(sel.tolist(), strings):
                out[i] = s
    return out
