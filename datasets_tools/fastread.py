"""Direct per-sample reads of a local sharded latents array, bypassing zarr-python's per-call overhead.

zarr-python needs ~2 ms per single-chunk read; training wants tens of thousands of random
samples per second. This reader implements just the layout the store writes (Zarr v3
``sharding_indexed`` codec, index at the end of each shard file — see the Zarr sharding
spec): it reads a shard's index once (S×16 bytes), then each sample with one ``pread``
and, when compressed, one zstd decode. Anything else (remote stores, other codecs)
returns ``None`` from :meth:`ShardedReader.try_open` and the caller uses zarr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

_EMPTY = np.uint64(2**64 - 1)


class ShardedReader:
    """Reads row ``i`` of a local array with shards ``(S, …)`` and inner chunks ``(1, …)``."""

    def __init__(self, folder: Path, shape: tuple[int, ...], shard_rows: int, dtype: np.dtype, zstd: bool,
                 fill_value: float):
        self.folder, self.shape, self.S, self.dtype = folder, shape, shard_rows, dtype
        self.row_shape = tuple(shape[1:])
        self.fill_value = fill_value
        self._zstd = None
        if zstd:
            from numcodecs import Zstd

            self._zstd = Zstd()
        self._index: dict[int, np.ndarray | None] = {}
        self._fds: dict[int, int] = {}

    @classmethod
    def try_open(cls, folder: str | os.PathLike) -> "ShardedReader | None":
        """A reader for the array in ``folder`` when its layout is the one we write, else ``None``."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
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
                or cfg.get("index_location", "end") != "end" or meta["data_type"] not in ("float16", "float32", "int8")):
            return None
        return cls(folder, tuple(meta["shape"]), shard[0], np.dtype(meta["data_type"]).newbyteorder("<"),
                   inner == ["bytes", "zstd"], meta.get("fill_value", 0.0) or 0.0)

    def _fd(self, shard: int) -> int | None:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.folder / "c" / str(shard) / "/".join("0" * (len(self.shape) - 1))
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
                n = self.S * 16
                size = os.fstat(fd).st_size
                raw = os.pread(fd, n, size - n - 4)
                self._index[shard] = np.frombuffer(raw, dtype="<u8").reshape(self.S, 2)
        return self._index[shard]

    def read(self, row: int) -> np.ndarray:
        """Row ``row`` as a numpy array (fill value where nothing was written)."""
        shard, j = divmod(row, self.S)
        index = self._shard_index(shard)
        if index is None or index[j, 0] == _EMPTY:
            return np.full(self.row_shape, self.fill_value, dtype=self.dtype)
        data = os.pread(self._fds[shard], int(index[j, 1]), int(index[j, 0]))
        if self._zstd is not None:
            data = self._zstd.decode(data)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.row_shape).copy()  # writable, for torch

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
