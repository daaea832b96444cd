"""Direct per-sample reads of a local sharded latents array, bypassing zarr-python's per-call overhead.

zarr-python needs ~2 ms per single-chunk read; training wants tens of thousands of random
samples per second. This reader implements just the layout the store writes (Zarr v3
``sharding_indexed`` codec, index at the end of each shard file — see the Zarr sharding
spec): it reads a shard's index once (S×16 bytes), then each sample with one ``pread``
and, when compressed, one zstd decode. Anything else (other codecs) returns ``None`` from
:meth:`ShardedReader.try_open` and the caller uses zarr. :class:`ShardLayout` (the parsed
``zarr.json``) also decodes whole shard objects, for :mod:`~datasets_tools.shardcache` (object stores).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import Zstd

_EMPTY = np.uint64(2**64 - 1)


@dataclass(frozen=True)
class ShardLayout:
    """A sharded array as the store writes it: shards ``(S, …)`` of inner chunks ``(1, …)``, index at the end."""

    shape: tuple[int, ...]
    shard_rows: int
    dtype: np.dtype
    zstd: bool
    fill_value: float

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "ShardLayout | None":
        """The layout of an array from its ``zarr.json`` document, or ``None`` when it is not one we write."""
        codecs = meta.get("codecs", [])
        enc = meta.get("chunk_key_encoding", {})
        if (len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or enc.get("name") != "default"
                or enc.get("configuration", {}).get("separator", "/") != "/"):
            return None
        cfg = codecs[0]["configuration"]
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
        inner = [c["name"] for c in cfg["codecs"]]
        index = [c["name"] for c in cfg["index_codecs"]]
        little = all(c.get("configuration", {}).get("endian", "little") == "little"
                     for c in cfg["codecs"] + cfg["index_codecs"] if c["name"] == "bytes")
        if (cfg["chunk_shape"] != [1, *meta["shape"][1:]] or shard[1:] != meta["shape"][1:] or not little
                or inner not in (["bytes"], ["bytes", "zstd"]) or index != ["bytes", "crc32c"]
                or cfg.get("index_location", "end") != "end"
                or meta["data_type"] not in ("float16", "float32", "int8")):
            return None
        return cls(tuple(meta["shape"]), shard[0], np.dtype(meta["data_type"]).newbyteorder("<"),
                   inner == ["bytes", "zstd"], meta.get("fill_value", 0.0) or 0.0)

    def shard_key(self, shard: int) -> str:
        """Path of shard ``shard``'s object relative to the array's folder."""
        return "c/" + str(shard) + "/" + "/".join("0" * (len(self.shape) - 1))

    @property
    def index_bytes(self) -> int:
        """Size of the index at the end of a shard object: S (offset, length) pairs + crc32c."""
        return self.shard_rows * 16 + 4

    def index(self, raw: bytes) -> np.ndarray:
        """The ``(S, 2)`` (offset, length) pairs of a shard from its last :attr:`index_bytes` bytes (the crc32c at
        the end is not checked)."""
        return np.frombuffer(raw[:self.shard_rows * 16], dtype="<u8").reshape(self.shard_rows, 2)

    def row(self, chunk: bytes, zstd: Zstd | None) -> np.ndarray:
        """One row from its stored bytes, zstd-decoded with ``zstd`` when the array is compressed (read-only)."""
        return np.frombuffer(zstd.decode(chunk) if zstd is not None else chunk, dtype=self.dtype
                             ).reshape(self.shape[1:])

    def decode_shard(self, data: bytes) -> np.ndarray:
        """All ``(S, …)`` rows of a whole shard object (fill value where a row was never written)."""
        out = np.full((self.shard_rows, *self.shape[1:]), self.fill_value, dtype=self.dtype)
        zstd = Zstd() if self.zstd else None
        for j, (offset, length) in enumerate(self.index(data[-self.index_bytes:]).tolist()):
            if offset != int(_EMPTY):
                out[j] = self.row(data[offset:offset + length], zstd)
        return out


class ShardedReader:
    """Reads row ``i`` of a local array with shards ``(S, …)`` and inner chunks ``(1, …)``."""

    def __init__(self, folder: Path, layout: ShardLayout):
        self.folder, self.layout = folder, layout
        self.shape, self.S, self.dtype = layout.shape, layout.shard_rows, layout.dtype
        self.row_shape = tuple(self.shape[1:])
        self.fill_value = layout.fill_value
        self._zstd = Zstd() if layout.zstd else None
        self._index: dict[int, np.ndarray | None] = {}
        self._fds: dict[int, int] = {}

    @classmethod
    def try_open(cls, folder: str | os.PathLike) -> "ShardedReader | None":
        """A reader for the array in ``folder`` when its layout is the one we write, else ``None``."""
        folder = Path(folder)
        try:
            layout = ShardLayout.from_metadata(json.loads((folder / "zarr.json").read_text()))
        except (OSError, ValueError):
            return None
        return None if layout is None else cls(folder, layout)

    def _fd(self, shard: int) -> int | None:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.folder / self.layout.shard_key(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            self._fds[shard] = fd
        return fd

    def _shard_index(self, shard: int) -> np.ndarray | None:
        if shard not in self._index:
            fd = self._fd(shard)
            if fd is None:
                self._index[shard] = None
            else:
                n = self.layout.index_bytes
                self._index[shard] = self.layout.index(os.pread(fd, n, os.fstat(fd).st_size - n))
        return self._index[shard]

    def read(self, row: int) -> np.ndarray:
        """Row ``row`` as a numpy array (fill value where nothing was written)."""
        shard, j = divmod(row, self.S)
        index = self._shard_index(shard)
        if index is None or index[j, 0] == _EMPTY:
            return np.full(self.row_shape, self.fill_value, dtype=self.dtype)
        data = os.pread(self._fds[shard], int(index[j, 1]), int(index[j, 0]))
        return self.layout.row(data, self._zstd).copy()  # writable, for torch

    def close(self) -> None:
        """Close the open shard files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
