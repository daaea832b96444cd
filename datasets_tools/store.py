"""The Zarr v3 latent store (format ``cascade-codec-latents``, version 2; version 1 is read, not written).

Layout (paths relative to the store root; documented for independent readers in
``datasets_tools/FORMAT.md``)::

    zarr.json                 root group; attributes below
    plan/unit_{k:06d}.json    samples owned by unit k (written once, never changed)
    commits/unit_{k:06d}.json commit record of unit k: counts per bucket, errors, warnings
    b{H}x{W}/                 one group per bucket (encoder input H×W pixels)
        latents   (N,16,H/32,W/32) float16|float32|int8 (+ root attribute quantization), shards (S,…), chunks (1,…)
        optional, same dtype (float16 in int8 stores) and sharding: clip_text_pooled (N,1,C), clip_text (N,77,C) — CLIP text
        embeddings of the captions; stage_a (N,4,H/4,W/4) — Stage A latents (attribute ``extras``)
        id, source, caption   string columns (``string_columns``): {name}_offsets (N,2) int64 shards (S,2),
                              {name}_bytes uint8, unit k's bytes in [k·2³², (k+1)·2³²); version 1: (N,) vlen str
        orig_size (N,2) int32 (h, w);  crop_box (N,4) int32 (left, top, right, bottom)
        index     (M,) int64  rows holding samples, in plan order (written by finalise)
    errors/   id, source, reason (string columns) — skipped samples (written by finalise)
    warnings/ id, source, reason (string columns) — encoded samples with a problem (e.g. unreadable caption)

N = n_units·S. Unit k owns rows [k·S, (k+1)·S) of every bucket array, i.e. whole
shards, so writers never share a shard. A unit is visible only once its commit
record exists; readers use ``index`` (or, before finalisation, the commit records).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from codec.errors import CascadeError

from . import string_columns
from .quantize import ChannelQuantization
from .sources import Sample

FORMAT = "cascade-codec-latents"
FORMAT_VERSION = 2
# Version 1 kept the string columns as zarr-python's "string" data type, which is not a core Zarr v3 type.
STRING_DTYPE_VERSION = 2
UPGRADE_ATTR = "upgrade"  # root attribute present while `cascade upgrade-store` converts a store
LATENT_CHANNELS = 16
BUCKET_RE = re.compile(r"^b(\d+)x(\d+)$")
IDENTITY_KEYS = ("format", "format_version", "encoder", "preprocess", "dtype", "latent_channels", "shard_size")
STRING_ARRAYS = ("id", "source", "caption")
TABLES = ("errors", "warnings")
TABLE_COLUMNS = ("id", "source", "reason")
# Optional extras: key in the ``extras`` attribute → (what they are, the option asking for them, their weights).
EXTRAS = {"clip": ("CLIP text embeddings", "--text-encoder", "text encoder"),
          "stage_a": ("Stage A latents", "--stage-a", "Stage A")}
EMPTY_TEXT = "clip_empty"  # group holding the CLIP embeddings of the empty caption (stores with extra ``clip``)


# Called with the name of each point where a writer killed there must still leave a resumable store:
# "plan unit K", "capacity", "write unit K" (rows written, not yet committed), "commit unit K",
# "finalise index", "finalise tables". Tests pass one that blocks at a chosen point until they kill -9 the process.
StoreHook = Callable[[str], None]


def row_shapes(bucket: tuple[int, int], extras: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every float array of a bucket: ``latents`` plus the extras the store holds."""
    h, w = bucket
    shapes: dict[str, tuple[int, ...]] = {"latents": (LATENT_CHANNELS, h // 32, w // 32)}
    if "clip" in extras:
        clip = extras["clip"]
        shapes["clip_text_pooled"] = (1, int(clip["pooled_dim"]))
        shapes["clip_text"] = (int(clip["tokens"]), int(clip["hidden_dim"]))
    if "stage_a" in extras:
        shapes["stage_a"] = (int(extras["stage_a"]["channels"]), h // 4, w // 4)
    return shapes


def extras_dtype(dtype: str) -> str:
    """Storage dtype of the extras in a store of ``dtype``: an int8 store quantises only the latents (the extras'
    value ranges are unknown without trained weights; see FORMAT.md) and keeps its extras in float16."""
    return "float16" if dtype == "int8" else dtype


def array_dtype(key: str, dtype: str) -> str:
    """Storage dtype of float array ``key`` (``latents`` or an extra's array) in a store of ``dtype``."""
    return dtype if key == "latents" else extras_dtype(dtype)


def extras_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Lines naming how a run's extras (``clip``, ``stage_a``) differ from a store's (empty when they agree).

    The weights' place (``source``) may change; their sha256, dtype and shapes may not.
    """
    out = []
    for key, (what, option, weights) in EXTRAS.items():
        have, want = stored.get(key), wanted.get(key)
        if have is None and want is None:
            continue
        if have is None:
            out.append(f"{what} ({option}): the store has none, this run would add them")
        elif want is None:
            out.append(f"{what} ({option}): the store has them ({weights} sha256 {str(have.get('sha256'))[:12]}…), "
                       f"this run has none; pass {option} with the same weights")
        else:
            fields = sorted(f for f in set(have) | set(want) if f != "source" and have.get(f) != want.get(f))
            out += [f"{weights} {f}: store has {have.get(f)!r}, this run {want.get(f)!r}" for f in fields]
    return out


class StoreError(CascadeError):
    """The output is not a usable store (foreign, incompatible, damaged); the message says why and what to do."""


def bucket_name(bucket: tuple[int, int]) -> str:
    """``(768, 768)`` → ``"b768x768"``."""
    return f"b{bucket[0]}x{bucket[1]}"


def parse_bucket(name: str) -> tuple[int, int]:
    """``"b768x768"`` → ``(768, 768)``."""
    m = BUCKET_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a bucket name (b<H>x<W>)")
    return int(m.group(1)), int(m.group(2))


def is_url(s: str) -> bool:
    """Whether ``s`` is an fsspec URL (``s3://…``) rather than a local path."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s)) and not s.startswith("file://")


class Location:
    """Where a store lives (local folder or fsspec URL): the zarr store plus small JSON side files."""

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        self.url = str(url).rstrip("/")
        if not is_url(self.url):
            self.url = os.path.expanduser(self.url)
        self.storage_options = dict(storage_options or {})
        self.local = not is_url(self.url)
        if self.local:
            self.path = Path(self.url[len("file://"):] if self.url.startswith("file://") else self.url)
        else:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def zarr_store(self, read_only: bool = False):
        """A zarr ``LocalStore`` or ``FsspecStore`` for this location."""
        import zarr.storage

        if self.local:
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options or None,
                                                 read_only=read_only)

    def _full(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str = "") -> bool:
        """Whether ``rel`` (or the root when empty) exists."""
        if self.local:
            return (self.path / rel).exists() if rel else self.path.exists()
        return self.fs.exists(self._full(rel) if rel else self.root)

    def is_empty_dir(self) -> bool:
        """Whether the root is absent or an empty folder/prefix."""
        if self.local:
            return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))
        try:
            return not self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True

    def read_json(self, rel: str) -> Any:
        """Parsed JSON at ``rel``, or ``None`` when absent."""
        try:
            if self.local:
                data = (self.path / rel).read_bytes()
            else:
                data = self.fs.cat_file(self._full(rel))
        except FileNotFoundError:
            return None
        return json.loads(data)

    def write_json(self, rel: str, obj: Any) -> None:
        """Write JSON atomically: local temp file + ``os.replace``; remote: one PUT (object stores are atomic)."""
        data = json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()
        if self.local:
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(self._full(rel), data)

    def write_once(self, rel: str, data: bytes) -> None:
        """Create ``rel`` with ``data`` unless it exists, atomically and without replacing a concurrent writer's file.

        Local: a private temp file hard-linked into place (``link`` fails if the name exists,
        so readers see the whole file or none). Object stores: one PUT when absent (a PUT is
        atomic; callers write identical bytes, so a concurrent duplicate PUT is harmless).
        """
        if self.local:
            target = self.path / rel
            if target.exists():
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                tmp.write_bytes(data)
                os.link(tmp, target)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        elif not self.fs.exists(self._full(rel)):
            self.fs.pipe_file(self._full(rel), data)

    def list_names(self, rel: str) -> list[str]:
        """Sorted file names directly under ``rel`` (empty when absent)."""
        if self.local:
            d = self.path / rel
            return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []
        try:
            self.fs.invalidate_cache()
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self._full(rel), detail=False))
        except FileNotFoundError:
            return []


def _unit_file(k: int) -> str:
    return f"unit_{k:06d}.json"


def _unit_of(name: str) -> int | None:
    m = re.fullmatch(r"unit_(\d+)\.json", name)
    return int(m.group(1)) if m else None


class LatentStore:
    """Read/write access to one store. Create or check with :meth:`open_for_writing`, read with :meth:`open`."""

    def __init__(self, location: Location, group, hook: StoreHook | None = None):
        self.location = location
        self.group = group
        self.hook = hook
        self._complete_buckets: set[str] = set()

    def _reached(self, point: str) -> None:
        if self.hook is not None:
            self.hook(point)

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, url: str | os.PathLike, storage_options: dict[str, Any] | None = None,
             mode: str = "r", hook: StoreHook | None = None, upgrading: bool = False) -> "LatentStore":
        """Open an existing store (``mode`` "r" or "r+"); :class:`StoreError` if it is not one of ours.

        ``hook`` (see :data:`StoreHook`) is told each point a writer passes. A store whose upgrade was
        interrupted is refused unless ``upgrading`` (the upgrade itself)."""
        import zarr

        loc = Location(url, storage_options)
        if not loc.exists("zarr.json"):
            raise StoreError(f"{loc.url} is not a cascade-codec latent store (no zarr.json); make one with "
                             "`cascade encode-dataset SOURCE OUT`.")
        group = zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode)
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{loc.url} is a Zarr group but not a cascade-codec latent store "
                             f"(format attribute {attrs.get('format')!r}, expected {FORMAT!r}).")
        if attrs.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(f"{loc.url} has format version {attrs['format_version']}; this tool reads up to "
                             f"{FORMAT_VERSION}. Upgrade cascade-codec.")
        if UPGRADE_ATTR in attrs and not upgrading:
            raise StoreError(f"{loc.url}: an upgrade to format version {attrs[UPGRADE_ATTR].get('to')} was "
                             f"interrupted; run `cascade upgrade-store {loc.url}` again to finish it.")
        return cls(loc, group, hook)

    @classmethod
    def open_for_writing(cls, url: str | os.PathLike, identity: dict[str, Any],
                         storage_options: dict[str, Any] | None = None, create: bool = True,
                         hook: StoreHook | None = None) -> "LatentStore | None":
        """Open (after checking ``identity``) or create a store. Refuses foreign or incompatible outputs.

        With ``create=False`` a missing store gives ``None`` (dry runs write nothing). ``hook``: as in :meth:`open`.
        """
        import zarr

        loc = Location(url, storage_options)
        if loc.local and loc.path.exists() and not loc.path.is_dir():
            raise StoreError(f"{loc.url} is a file, not a latent store; choose another output path.")
        if loc.exists("zarr.json"):
            store = cls.open(url, storage_options, mode="r+", hook=hook)
            if store.format_version < FORMAT_VERSION:
                raise StoreError(f"{loc.url} is a format-version-{store.format_version} store; this cascade-codec "
                                 f"writes version {FORMAT_VERSION} only and never mixes the two. Convert it in place "
                                 f"with `cascade upgrade-store {loc.url}`, then run this command again.")
            store.check_identity(identity)
            return store
        if not loc.is_empty_dir():
            raise StoreError(f"{loc.url} exists and is not a cascade-codec latent store (no zarr.json, not empty); "
                             "refusing to write into it. Choose a new output path or delete it.")
        if not create:
            return None
        attrs = {**identity, "count": 0, "buckets": {}, "complete": False, "n_units": 0}
        group = zarr.create_group(store=loc.zarr_store(), attributes=attrs, overwrite=False)
        group.create_group("plan", attributes={"about": "unit_{k:06d}.json: samples owned by unit k"})
        group.create_group("commits", attributes={"about": "unit_{k:06d}.json: commit record of unit k"})
        return cls(loc, group, hook)

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes (a copy)."""
        return dict(self.group.attrs)

    @property
    def format_version(self) -> int:
        """The store's ``format_version`` (1 or 2)."""
        return int(self.group.attrs.get("format_version", 1))

    @property
    def shard_size(self) -> int:
        """S: samples per unit and rows per shard."""
        return int(self.group.attrs["shard_size"])

    @property
    def extras(self) -> dict[str, Any]:
        """The optional arrays this store holds (``{}`` for stores without any, including older ones)."""
        return dict(self.group.attrs.get("extras") or {})

    def quantization(self, key: str = "latents") -> ChannelQuantization | None:
        """Per-channel scale and offset of array ``key`` when the store keeps it as int8, else ``None``."""
        q = (self.group.attrs.get("quantization") or {}).get(key)
        return None if q is None else ChannelQuantization.from_json(q)

    def to_storage(self, key: str, values: Any) -> np.ndarray:
        """One sample's float array ``key`` in its storage dtype: quantised with the store's :meth:`quantization`
        for int8, else rounded to nearest (values already in the storage dtype are returned as they are)."""
        dtype = np.dtype(array_dtype(key, self.group.attrs["dtype"]))
        values = np.asarray(values)
        if values.dtype == dtype:
            return values
        q = self.quantization(key) if dtype == np.int8 else None
        if dtype == np.int8 and q is None:
            raise StoreError(f"{self.location.url}: the int8 array {key} has no quantization attribute; the store "
                             "is damaged. Encode into a new output path.")
        return q.quantize(values) if q is not None else values.astype(dtype)

    def check_identity(self, identity: dict[str, Any]) -> None:
        """Raise :class:`StoreError` naming every setting that differs from the store's."""
        attrs = self.attrs
        diffs = []
        for key in IDENTITY_KEYS:
            mine, theirs = attrs.get(key), identity.get(key)
            if key == "encoder":
                mine, theirs = (mine or {}).get("sha256"), (theirs or {}).get("sha256")
            if mine != theirs:
                diffs.append(f"{'encoder sha256' if key == 'encoder' else key}: store has {mine!r}, this run "
                             f"{theirs!r}")
        diffs += extras_differences(attrs.get("extras") or {}, identity.get("extras") or {})
        if diffs:
            raise StoreError(f"{self.location.url} was made with different settings:\n  " + "\n  ".join(diffs)
                             + "\nUse the same settings to resume or extend it, or write to a new output path.")

    # ----------------------------------------------------------------- plan
    def read_plan(self, root: str | None = None) -> list[list[Sample]]:
        """The planned units in order (unit k = element k); relative locations are resolved against ``root``."""
        names = [n for n in self.location.list_names("plan") if _unit_of(n) is not None]
        units = sorted(_unit_of(n) for n in names)
        if units != list(range(len(units))):
            missing = sorted(set(range(max(units) + 1)) - set(units)) if units else []
            raise StoreError(f"{self.location.url}: plan/ is missing units {missing[:5]}; the store is damaged. "
                             "Encode into a new output path.")
        plan = []
        for k in units:
            obj = self.location.read_json(f"plan/{_unit_file(k)}")
            plan.append([Sample.from_json(d, root) for d in obj["samples"]])
        return plan

    def append_units(self, units: list[list[Sample]], first: int, root: str | None = None) -> None:
        """Persist new units ``first, first+1, …`` (each file written once, atomically), locations relative to
        ``root`` (the source root) when given."""
        for i, samples in enumerate(units):
            k = first + i
            self.location.write_json(f"plan/{_unit_file(k)}",
                                     {"unit": k, "samples": [s.to_json(root) for s in samples]})
            self._reached(f"plan unit {k}")

    # ----------------------------------------------------------------- arrays
    def bucket_names(self) -> list[str]:
        """Names of the bucket groups present."""
        return sorted(name for name in self.group.group_keys() if BUCKET_RE.match(name))

    def _bucket_documents(self, bucket: tuple[int, int], n_units: int) -> dict[str, bytes]:
        """The ``zarr.json`` documents of a bucket group and its arrays (group first), built in memory.

        They depend only on (bucket, n_units, S, dtype, extras), which every writer of a run
        shares, so any two writers build byte-identical documents.
        """
        import zarr
        import zarr.storage

        name, S, n = bucket_name(bucket), self.shard_size, n_units * self.shard_size
        dtype = self.group.attrs["dtype"]
        docs: dict[str, Any] = {}
        g = zarr.create_group(store=zarr.storage.MemoryStore(docs), path=name, attributes={"bucket": list(bucket)})
        for key, shape in row_shapes(bucket, self.extras).items():
            # Uncompressed: zstd saves ~8 % on real-scale latents but costs ~50 µs per read.
            g.create_array(key, shape=(n, *shape), shards=(S, *shape), chunks=(1, *shape),
                           dtype=array_dtype(key, dtype), fill_value=0, compressors=None)
        for key, width in (("orig_size", 2), ("crop_box", 4)):
            g.create_array(key, shape=(n, width), shards=(S, width), chunks=(S, width), dtype="int32", fill_value=0)
        for key in STRING_ARRAYS:
            string_columns.create_column(g, key, n, n_units * string_columns.REGION_BYTES, shard_rows=S)
        ours = sorted((k for k in docs if k.startswith(name + "/")), key=lambda k: (k.count("/"), k))
        return {k: docs[k].to_bytes() for k in ours}

    def _create_bucket(self, bucket: tuple[int, int], n_units: int) -> None:
        """Create whatever of the bucket is missing (documents written once each, atomically; see FORMAT.md)."""
        for rel, data in self._bucket_documents(bucket, n_units).items():
            self.location.write_once(rel, data)

    def ensure_bucket(self, bucket: tuple[int, int], n_units: int):
        """The bucket's group with all its arrays (capacity ``n_units·S`` rows), created when absent.

        Any writer may call this (``keep-aspect`` buckets are not known before images are
        decoded): creation is a deterministic create-if-absent that concurrent writers can
        race safely (identical documents, each published atomically, existing ones never
        replaced). Only the planner (:meth:`set_capacity`) grows existing arrays.
        """
        name = bucket_name(bucket)
        if name in self._complete_buckets:
            return self.group[name]
        self._create_bucket(bucket, n_units)
        g = self.group[name]
        small = [key for key in g.array_keys()
                 if key != "index" and g[key].shape[0] < capacity(key, n_units, self.shard_size)]
        if small:
            raise StoreError(f"{self.location.url}: arrays {small} of bucket {name} are too short for the plan's "
                             f"{n_units} units; the store was changed by something other than this tool. Encode into "
                             "a new output path.")
        self._complete_buckets.add(name)
        return g

    def set_capacity(self, n_units: int, buckets: Iterable[tuple[int, int]] = ()) -> None:
        """Planner only (before any writer starts): create ``buckets``, complete buckets a killed writer left
        half-created, and grow every bucket array to its :func:`capacity` for ``n_units`` units."""
        for b in {*buckets, *(parse_bucket(name) for name in self.bucket_names())}:
            self._create_bucket(b, n_units)
        for name in self.bucket_names():
            g = self.group[name]
            for key in g.array_keys():
                a, n = g[key], capacity(key, n_units, self.shard_size)
                if key != "index" and a.shape[0] < n:
                    a.resize((n, *a.shape[1:]))
        self._reached("capacity")
        grew = n_units > int(self.group.attrs.get("n_units", 0))
        # New units are not finalised yet: readers fall back to the commit records until finalise() is done.
        if grew:
            self.group.attrs.update({"n_units": n_units, "complete": False})

    def write_unit(self, k: int, n_units: int, rows: dict[tuple[int, int], dict[str, Any]]) -> None:
        """Write unit ``k``'s samples: for each bucket, whole shards of every array (padded with fill values)."""
        S = self.shard_size
        sl = slice(k * S, (k + 1) * S)
        for bucket, data in rows.items():
            g = self.ensure_bucket(bucket, n_units)
            count = len(data["id"])
            for key, shape in row_shapes(bucket, self.extras).items():
                block = np.zeros((S, *shape), dtype=array_dtype(key, self.attrs["dtype"]))
                if count:
                    block[:count] = np.stack([self.to_storage(key, v) for v in data[key]]).reshape(count, *shape)
                g[key][sl] = block
            for key, width in (("orig_size", 2), ("crop_box", 4)):
                arr = np.zeros((S, width), dtype=np.int32)
                arr[:count] = np.asarray(data[key], dtype=np.int32).reshape(count, width)
                g[key][sl] = arr
            for key in STRING_ARRAYS:
                string_columns.write_rows(g, key, k * S, k * string_columns.REGION_BYTES,
                                          list(data[key]) + [""] * (S - count))
        self._reached(f"write unit {k}")

    def write_empty_text(self, hidden: np.ndarray, pooled: np.ndarray) -> None:
        """Store the embeddings of the empty caption ``""`` (``(77,C)``, ``(1,C)``) in group ``clip_empty``;
        its ``complete`` attribute is set last, so a half-written group reads as absent."""
        g = self.group.require_group(EMPTY_TEXT)
        g.attrs.update({"complete": False, "about": 'CLIP text embeddings of the empty caption ""'})
        dtype = extras_dtype(self.group.attrs["dtype"])
        for key, value in (("clip_text", hidden), ("clip_text_pooled", pooled)):
            a = g.create_array(key, shape=value.shape, chunks=value.shape, dtype=dtype, fill_value=0, overwrite=True)
            a[...] = np.asarray(value, dtype=dtype)
        g.attrs.update({"complete": True})

    def empty_text(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(clip_text (77,C), clip_text_pooled (1,C))`` of the empty caption, or ``None`` when not stored."""
        if EMPTY_TEXT not in self.group.group_keys() or not self.group[EMPTY_TEXT].attrs.get("complete"):
            return None
        g = self.group[EMPTY_TEXT]
        return g["clip_text"][...], g["clip_text_pooled"][...]

    # ----------------------------------------------------------------- commits
    def commit(self, k: int, record: dict[str, Any]) -> None:
        """Make unit ``k`` visible: write its commit record atomically."""
        self.location.write_json(f"commits/{_unit_file(k)}", {"unit": k, "time": time.time(), **record})
        self._reached(f"commit unit {k}")

    def committed_units(self) -> set[int]:
        """Indices of committed units."""
        return {u for n in self.location.list_names("commits") if (u := _unit_of(n)) is not None}

    def commit_records(self) -> dict[int, dict[str, Any]]:
        """All commit records by unit."""
        return {k: self.location.read_json(f"commits/{_unit_file(k)}") for k in sorted(self.committed_units())}

    def finalise(self, n_units: int) -> dict[str, Any]:
        """Rank 0, after all units: write per-bucket ``index``, the ``errors``/``warnings`` tables and attributes."""
        S = self.shard_size
        self.group.attrs.update({"complete": False})  # a crash while rewriting the index must not expose it
        records = self.commit_records()
        index: dict[str, list[np.ndarray]] = {name: [] for name in self.bucket_names()}
        errors: list[list[str]] = []
        warnings: list[list[str]] = []
        for k in sorted(records):
            rec = records[k]
            for name, count in rec["counts"].items():
                index.setdefault(name, []).append(np.arange(k * S, k * S + count, dtype=np.int64))
            errors += rec.get("errors", [])
            warnings += rec.get("warnings", [])
        counts = {}
        for name, parts in sorted(index.items()):
            rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            g = self.group[name]
            a = g.create_array("index", shape=rows.shape, chunks=(max(1, min(len(rows), 1 << 16)),),
                               dtype="int64", overwrite=True)
            if len(rows):
                a[:] = rows
            counts[name] = int(len(rows))
        self._reached("finalise index")
        for table, items in zip(TABLES, (errors, warnings)):
            g = self.group.require_group(table)
            for col, key in enumerate(TABLE_COLUMNS):
                string_columns.write_column(g, key, [it[col] for it in items])
        self._reached("finalise tables")
        complete = set(records) >= set(range(n_units))
        summary = {"count": sum(counts.values()), "buckets": counts, "errors": len(errors),
                   "warnings": len(warnings), "complete": complete, "n_units": n_units}
        if any("clamped" in rec for rec in records.values()):  # int8: latent values stored at the range's end
            summary["clamped"] = sum(int(rec.get("clamped", 0)) for rec in records.values())
        self.group.attrs.update(summary)  # last: `complete` is true only once the index above is whole
        return summary

    # ----------------------------------------------------------------- reading
    def visible_rows(self) -> dict[str, np.ndarray]:
        """Rows of committed samples per bucket: the ``index`` arrays when finalised, else the commit records."""
        if self.attrs.get("complete"):
            out = {}
            for name in self.bucket_names():
                g = self.group[name]
                out[name] = g["index"][:] if "index" in g.array_keys() else np.zeros(0, dtype=np.int64)
            return out
        S = self.shard_size
        out_parts: dict[str, list[np.ndarray]] = {}
        for k, rec in self.commit_records().items():
            for name, count in rec["counts"].items():
                out_parts.setdefault(name, []).append(np.arange(k * S, k * S + count, dtype=np.int64))
        return {n: np.concatenate(p) for n, p in sorted(out_parts.items())}

    def strings(self, group: str, column: str, rows: np.ndarray | None = None) -> list[str]:
        """The strings of ``column`` (``id``, ``source``, ``caption``, ``reason``) in ``group`` (a bucket or a
        table) at ``rows`` (all by default), whichever format version wrote them."""
        g = self.group[group]
        if self.format_version >= STRING_DTYPE_VERSION:
            return string_columns.read_column(g, column, rows)
        values = g[column][:] if g[column].shape[0] else np.zeros(0, dtype=str)
        return [str(v) for v in (values if rows is None else values[np.asarray(rows, dtype=np.int64)]).tolist()]

    def table(self, name: str) -> list[tuple[str, str, str]]:
        """The ``errors`` or ``warnings`` table as (id, source, reason) rows (finalised stores)."""
        if name not in self.group.group_keys():
            return []
        return list(zip(*(self.strings(name, key) for key in TABLE_COLUMNS)))


def store_info(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> str:
    """A human-readable summary of a store (for ``cascade info STORE``)."""
    store = LatentStore.open(url, storage_options)
    a = store.attrs
    rows = store.visible_rows()
    extras = store.extras
    lines = [f"latent store: {store.location.url}",
             f"  format: {a['format']} v{a['format_version']}  ({a.get('tool', '?')})"
             + (f"  (older format, read as it is; `cascade upgrade-store {store.location.url}` converts it to "
                f"v{FORMAT_VERSION})" if store.format_version < FORMAT_VERSION else ""),
             f"  encoder: {a['encoder'].get('file')} sha256 {a['encoder'].get('sha256', '')[:16]}…"
             + (f"  (model: {a['model']})" if a.get("model") else ""),
             f"  preprocess: {json.dumps(a['preprocess'], sort_keys=True)}",
             f"  dtype: {a['dtype']}  shard size: {a['shard_size']}"
             + ("  (latents int8 with per-channel scale/offset, extras float16)" if a["dtype"] == "int8" else "")]
    if a.get("source_root"):
        lines.append(f"  source root: {a['source_root']}  (relative sources are relative to it)")
    for run in a.get("runs") or []:
        lines.append(f"  encoded on {run.get('device')} × {run.get('processes', 1)} process(es) in "
                     f"{run.get('precision')}, {run.get('started')} ({run.get('tool')})")
    if "clip" in extras:
        c = extras["clip"]
        lines.append(f"  clip_text_pooled 1×{c['pooled_dim']}, clip_text {c['tokens']}×{c['hidden_dim']}: CLIP text "
                     f"embeddings ({c['dtype']}), text encoder {c.get('source')} sha256 {c['sha256'][:16]}…")
    if "stage_a" in extras:
        sa = extras["stage_a"]
        lines.append(f"  stage_a {sa['channels']}×H/4×W/4: Stage A latents ({sa['dtype']}), {sa['file']} sha256 "
                     f"{sa['sha256'][:16]}…")
    lines.append(f"  samples: {sum(len(r) for r in rows.values())}"
                 + ("" if a.get("complete") else "  (INCOMPLETE: not finalised; run encode-dataset again to finish)"))
    for name, r in rows.items():
        bucket = parse_bucket(name)
        shapes = "; ".join(f"{key} {'×'.join(map(str, shape))}" for key, shape in row_shapes(bucket, extras).items())
        lines.append(f"    {name}: {len(r)} samples, {shapes}")
    if a["dtype"] == "int8":
        values = sum(len(r) * math.prod(row_shapes(parse_bucket(name), extras)["latents"]) for name, r in rows.items())
        clamped = a.get("clamped")
        lines.append("  int8 range: " + ("not counted yet (finalised stores say)" if clamped is None else
                                          f"{clamped:,} of {values:,} latent values ({clamped / max(values, 1):.2e}) "
                                          "lay outside it and are stored clamped"))
    errors = store.table("errors")
    lines.append(f"  errors (skipped): {len(errors)}")
    reasons: dict[str, int] = {}
    for _, _, reason in errors:
        key = reason.split(":", 1)[0]
        reasons[key] = reasons.get(key, 0) + 1
    for key, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {n} × {key}")
    warnings = store.table("warnings")
    if warnings:
        lines.append(f"  warnings (encoded anyway): {len(warnings)}")
    return "\n".join(lines)


def capacity(key: str, n_units: int, shard_size: int) -> int:
    """Length along axis 0 that bucket array ``key`` needs for ``n_units`` units: one region per unit for a string
    column's bytes, ``n_units·S`` rows for every other array."""
    if string_columns.is_bytes_name(key):
        return n_units * string_columns.REGION_BYTES
    return n_units * shard_size


def is_latent_store(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` (folder or fsspec URL) is a latent store: a ``zarr.json`` with our format attribute."""
    try:
        meta = Location(url, storage_options).read_json("zarr.json")
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a store
        return False
    return isinstance(meta, dict) and meta.get("attributes", {}).get("format") == FORMAT
