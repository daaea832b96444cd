"""Safetensors files, read and written in streams.

* Only ``.safetensors`` files are read: a pickle checkpoint can run arbitrary code when
  unpickled, so it is refused with a sentence saying so.
* Files are read tensor by tensor with plain reads (no memory map), each tensor cast to
  the target dtype and moved to the target device before the next is read. Peak memory
  is the tensors in their target dtype plus a 16 MiB buffer, never the whole file twice.
* A :class:`Checkpoint` is a view of one or more files (shards) whose tensors can be
  renamed, split, joined or transposed by a key plan without reading data; it is what
  loads the diffusers and ComfyUI layouts (:mod:`codec.layouts`) and what
  :func:`write_checkpoint` streams to a new file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import WeightsError
from ..files import atomic_write
from .names import META_CONFIG, META_NOTE, OFFICIAL_REPO

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """Parsed and validated header of a safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int

    @property
    def config(self) -> dict[str, Any] | None:
        """Model configuration stored by cascade-codec, if any."""
        raw = self.metadata.get(META_CONFIG)
        return json.loads(raw) if raw else None

    def n_params(self) -> int:
        """Number of elements over all tensors."""
        total = 0
        for info in self.tensors.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total

    def dtypes(self) -> set[torch.dtype]:
        """Set of tensor dtypes in the file."""
        return {info.dtype for info in self.tensors.values()}


def refuse_pickle(path: Path) -> None:
    """Raise :class:`WeightsError` if ``path`` looks like a pickle/zip torch checkpoint."""
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file is an 8-byte header length then "{": its first byte can be 0x80 or its first
    # two "PK" by chance (e.g. a header of 0x15f80 bytes), so only the pickle/zip magic without "{" counts.
    looks_pickled = head[8:9] != b"{" and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04")
    if path.suffix.lower() in _PICKLE_SUFFIXES or looks_pickled:
        raise WeightsError(
            f"{path} is a pickle-based PyTorch checkpoint. Loading pickle files can run arbitrary code, so "
            "cascade-codec only reads .safetensors files. Download the .safetensors version of this checkpoint "
            f"(the official ones are on https://huggingface.co/{OFFICIAL_REPO}), or convert a file you trust with "
            "`python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('IN.pt', weights_only=True), 'OUT.safetensors')\"`.")


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header (no tensor data is read)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist or is not a file.")
    refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise WeightsError(f"{path} is not a safetensors file: it is only {size} bytes long.")
        (n,) = struct.unpack("<Q", raw_len)
        if n > min(size - 8, 100 * 2**20):
            raise WeightsError(f"{path} is not a valid safetensors file (header length {n} does not fit in "
                               f"{size} bytes); the file may be truncated or of another format.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path} is not a valid safetensors file: its header is not JSON ({e}).") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a valid safetensors file: its header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for key, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: the header entry for {key!r} is malformed or has an unsupported dtype "
                               f"({entry!r}).") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * dtype.itemsize or start < 0:
            raise WeightsError(f"{path}: tensor {key!r} claims {end - start} bytes for shape {list(shape)} "
                               f"of {entry['dtype']}; the file is corrupt.")
        if end > data_len:
            raise WeightsError(f"{path} is truncated: tensor {key!r} ends at byte {8 + n + end} but the file has "
                               f"only {size} bytes. Download it again.")
        tensors[key] = TensorInfo(dtype, shape, start, end)
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + n)


@dataclass(frozen=True)
class Piece:
    """``numel`` consecutive elements of one stored tensor, from element ``offset`` of its flattened data."""

    header: SafetensorsHeader
    key: str
    offset: int
    numel: int

    @property
    def dtype(self) -> torch.dtype:
        """Stored dtype of the tensor this piece belongs to."""
        return self.header.tensors[self.key].dtype

    @property
    def file_start(self) -> int:
        """Absolute byte offset of the piece in its file."""
        info = self.header.tensors[self.key]
        return self.header.data_offset + info.start + self.offset * info.dtype.itemsize


@dataclass(frozen=True)
class Part:
    """Elements ``[offset, offset + numel)`` of the flattened tensor ``key``: one part of a mapped tensor.

    ``transpose``: the part is the whole 2-D tensor ``key`` transposed (it must then be the only part).
    """

    key: str
    offset: int
    numel: int
    transpose: bool = False


# A key mapping: target key → (target shape, the parts of source tensors it is made of, in order).
KeyPlan = dict[str, tuple[tuple[int, ...], list[Part]]]


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a :class:`Checkpoint`: its shape, its dtype on disk and where its bytes are.

    ``transposed``: the bytes hold the 2-D transpose of the tensor (shape ``shape[::-1]``, row-major);
    reading or writing it costs one tensor's worth of memory.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    transposed: bool = False

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def _slice_pieces(pieces: Sequence[Piece], offset: int, numel: int) -> list[Piece]:
    """The pieces covering elements ``[offset, offset + numel)`` of the concatenation of ``pieces``."""
    out, pos = [], 0
    for p in pieces:
        lo, hi = max(offset, pos), min(offset + numel, pos + p.numel)
        if lo < hi:
            out.append(Piece(p.header, p.key, p.offset + lo - pos, hi - lo))
        pos += p.numel
    return out


class Checkpoint:
    """The tensors of one or more safetensors files (e.g. shards), possibly renamed, split or joined.

    Nothing but headers is read until :func:`iter_checkpoint` or :func:`write_checkpoint`
    runs, so remapping the keys of a 14 GB file costs nothing. ``path`` names the
    source in messages.
    """

    def __init__(self, tensors: dict[str, StoredTensor], metadata: Mapping[str, str], path: str | os.PathLike):
        self.tensors = tensors
        self.metadata = dict(metadata)
        self.path = path

    @classmethod
    def from_header(cls, header: SafetensorsHeader) -> "Checkpoint":
        """The tensors of one parsed file, under their stored keys."""
        tensors = {k: StoredTensor(i.dtype, i.shape, (Piece(header, k, 0, math.prod(i.shape)),))
                   for k, i in header.tensors.items()}
        return cls(tensors, header.metadata, header.path)

    @classmethod
    def open(cls, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> "Checkpoint":
        """One file, or the shards of one checkpoint (a key in two shards is an error)."""
        if isinstance(paths, (str, os.PathLike)):
            return cls.from_header(read_header(paths))
        parts = [cls.from_header(read_header(p)) for p in paths]
        folder = Path(parts[0].path).parent if parts else Path(".")
        return cls.union(parts, f"{folder}/{{{','.join(Path(p.path).name for p in parts)}}}")

    @classmethod
    def union(cls, parts: Sequence["Checkpoint"], path: str | os.PathLike) -> "Checkpoint":
        """The tensors of several checkpoints as one (shards, or the models of an all-in-one file); a key in two
        parts is an error. Metadata is merged, later parts winning."""
        tensors: dict[str, StoredTensor] = {}
        metadata: dict[str, str] = {}
        for part in parts:
            twice = sorted(set(tensors) & set(part.tensors))
            if twice:
                raise WeightsError(f"{part.path} repeats {len(twice)} tensor(s) of another part (e.g. {twice[0]!r}); "
                                   "they do not belong to one checkpoint.")
            tensors.update(part.tensors)
            metadata.update(part.metadata)
        return cls(tensors, metadata, path)

    @property
    def config(self) -> dict[str, Any] | None:
        """Model configuration stored by cascade-codec, if any."""
        raw = self.metadata.get(META_CONFIG)
        return json.loads(raw) if raw else None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key → shape, in order."""
        return {k: t.shape for k, t in self.tensors.items()}

    def n_params(self) -> int:
        """Number of elements over all tensors."""
        return sum(t.numel for t in self.tensors.values())

    def dtypes(self) -> set[torch.dtype]:
        """Set of stored tensor dtypes."""
        return {t.dtype for t in self.tensors.values()}

    def remap(self, plan: KeyPlan) -> "Checkpoint":
        """A checkpoint whose tensors are made of parts of this one's, as ``plan`` says (no data is read)."""
        tensors = {}
        for key, (shape, parts) in plan.items():
            if any(part.transpose or self.tensors[part.key].transposed for part in parts):
                tensors[key] = self._transposed(key, tuple(shape), parts)
                continue
            pieces = [p for part in parts
                      for p in _slice_pieces(self.tensors[part.key].pieces, part.offset, part.numel)]
            if sum(p.numel for p in pieces) != math.prod(shape):
                raise RuntimeError(f"bug: the parts of {key!r} do not add up to its shape {list(shape)}")
            tensors[key] = StoredTensor(self.tensors[parts[0].key].dtype, tuple(shape), tuple(pieces))
        return Checkpoint(tensors, self.metadata, self.path)

    def _transposed(self, key: str, shape: tuple[int, ...], parts: Sequence[Part]) -> StoredTensor:
        """``key`` as one whole 2-D tensor, transposed or not, of a tensor that is or will be transposed."""
        (part,) = parts if len(parts) == 1 else (None,)
        src = self.tensors[part.key] if part is not None else None
        if src is None or len(src.shape) != 2 or part.offset != 0 or part.numel != src.numel or \
                shape != (src.shape[::-1] if part.transpose else src.shape):
            raise RuntimeError(f"bug: {key!r} must be one whole 2-D tensor, transposed or as it is")
        return StoredTensor(src.dtype, shape, src.pieces, src.transposed != part.transpose)


_CHUNK_BYTES = 1 << 24  # cast/copy granularity: the extra memory of reading or converting a checkpoint


class _Reader:
    """Open files of a checkpoint and one reused scratch buffer of at most ``_CHUNK_BYTES``."""

    def __init__(self) -> None:
        self.files: dict[Path, Any] = {}
        self.scratch = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()

    def _read(self, piece: Piece, start: int, out: memoryview) -> None:
        path = Path(piece.header.path)
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = open(path, "rb", buffering=0)
        f.seek(start)
        got = 0
        while got < len(out):
            k = f.readinto(out[got:])
            if not k:
                raise WeightsError(f"{path} is truncated while reading {piece.key!r}. Download it again.")
            got += k

    def read_into(self, piece: Piece, dest: torch.Tensor) -> None:
        """Read ``piece`` into ``dest`` (flat, contiguous, ``piece.numel`` elements, any dtype and device)."""
        if piece.numel == 0:
            return
        if dest.dtype == piece.dtype and dest.device.type == "cpu":
            self._read(piece, piece.file_start, memoryview(dest.view(torch.uint8).numpy()))
            return
        pos = 0
        for chunk in self.chunks(piece):
            dest[pos:pos + chunk.numel()].copy_(chunk)
            pos += chunk.numel()

    def chunks(self, piece: Piece) -> Iterator[torch.Tensor]:
        """``piece`` as consecutive CPU tensors of its dtype, each valid until the next one is produced."""
        size = piece.dtype.itemsize
        step = max(1, _CHUNK_BYTES // size)
        for first in range(0, piece.numel, step):
            n = min(step, piece.numel - first)
            if self.scratch.numel() < n * size:
                self.scratch = torch.empty(min(piece.numel, step) * size, dtype=torch.uint8)
            raw = self.scratch[:n * size]
            self._read(piece, piece.file_start + first * size, memoryview(raw.numpy()))
            yield raw.view(piece.dtype)


def _target_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if (dtype is not None and stored.is_floating_point) else stored


def _read_transposed(reader: "_Reader", st: StoredTensor, dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """A :attr:`StoredTensor.transposed` tensor read whole, transposed back, in ``dtype`` on ``device``."""
    raw = torch.empty(st.shape[::-1], dtype=dtype, device=device)
    flat, pos = raw.view(-1), 0
    for piece in st.pieces:
        reader.read_into(piece, flat[pos:pos + piece.numel])
        pos += piece.numel
    return raw.t().contiguous()


def iter_checkpoint(ckpt: Checkpoint, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time in file order, floats cast to ``dtype``, on ``device``.

    Each tensor is allocated once in its final dtype and device. Bytes that need no
    conversion are read straight into it; others go through one reused scratch buffer of
    at most 16 MiB, so reading adds no more than that to the memory the tensors take.
    """
    device = torch.device(device)

    def file_order(item: tuple[str, StoredTensor]) -> tuple[str, int]:
        pieces = item[1].pieces
        return (str(pieces[0].header.path), pieces[0].file_start) if pieces else ("", -1)

    with _Reader() as reader:
        for key, st in sorted(ckpt.tensors.items(), key=file_order):
            if st.transposed:
                yield key, _read_transposed(reader, st, _target_dtype(st.dtype, dtype), device)
                continue
            out = torch.empty(st.shape, dtype=_target_dtype(st.dtype, dtype), device=device)
            flat, pos = out.view(-1), 0
            for piece in st.pieces:
                reader.read_into(piece, flat[pos:pos + piece.numel])
                pos += piece.numel
            yield key, out


def iter_tensors(header: SafetensorsHeader, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_checkpoint` over one parsed file, under its stored keys."""
    return iter_checkpoint(Checkpoint.from_header(header), dtype, device)


def write_checkpoint(ckpt: Checkpoint, path: str | os.PathLike,
                     dtype: torch.dtype | None | Callable[[str], torch.dtype | None] = None,
                     metadata: Mapping[str, str] | None = None,
                     progress: Callable[[int], None] | None = None) -> Path:
    """Write ``ckpt`` as one safetensors file, floats cast to ``dtype``, streaming 16 MiB at a time.

    ``dtype`` may be a function of the key (``None``: keep the stored dtype), for files
    that bundle several models. The file is written by hand to the safetensors format
    (8-byte little-endian header length, JSON header padded to 8 bytes, raw little-endian
    tensor bytes in header order): safetensors' own writers take every tensor in memory
    at once. A transposed tensor (:attr:`StoredTensor.transposed`) is the one exception:
    it is read whole. ``progress`` is called with the number of bytes written after each
    chunk. The write is atomic.
    """
    path = Path(path)
    dtype_of = dtype if callable(dtype) else (lambda _key: dtype)
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
    offset = 0
    for key, st in ckpt.tensors.items():
        out = _target_dtype(st.dtype, dtype_of(key))
        header[key] = {"dtype": _DTYPE_NAMES[out], "shape": list(st.shape),
                       "data_offsets": [offset, offset + st.numel * out.itemsize]}
        offset += st.numel * out.itemsize
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path) as tmp:
        cast = torch.empty(0, dtype=torch.uint8)  # reused: fresh temporaries per chunk make glibc's heap grow
        with open(tmp, "wb") as f, _Reader() as reader:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for key, st in ckpt.tensors.items():
                out = _target_dtype(st.dtype, dtype_of(key))
                if st.transposed:
                    whole = _read_transposed(reader, st, out)
                    f.write(memoryview(whole.view(-1).view(torch.uint8).numpy()))
                    if progress is not None:
                        progress(whole.numel() * out.itemsize)
                    continue
                for piece in st.pieces:
                    for chunk in reader.chunks(piece):
                        data = chunk
                        if chunk.dtype != out:
                            if cast.numel() < chunk.numel() * out.itemsize:
                                cast = torch.empty(chunk.numel() * out.itemsize, dtype=torch.uint8)
                            data = cast[:chunk.numel() * out.itemsize].view(out)
                            data.copy_(chunk)
                        f.write(memoryview(data.view(torch.uint8).numpy()))
                        if progress is not None:
                            progress(data.numel() * out.itemsize)
    return path


def save_module(model: nn.Module, path: str | os.PathLike, config: Mapping[str, Any] | None = None,
                note: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Save ``model``'s state dict as safetensors (atomically), with its config and a note in the metadata."""
    return save_state(model.state_dict(), path, config, note, dtype)


def save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike, config: Mapping[str, Any] | None = None,
               note: str | None = None, dtype: torch.dtype | None = None,
               extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Save a state dict as safetensors (atomically), with a model config and a note in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in state.items()}
    metadata = {"format": "pt"}
    if config is not None:
        metadata[META_CONFIG] = json.dumps(config)
    if note:
        metadata[META_NOTE] = note
    metadata.update(extra_metadata or {})
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path
