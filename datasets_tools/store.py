"""The Zarr v3 latent store (format ``cascade-codec-latents``, version 1).

Layout (paths relative to the store root; documented for independent readers in
``datasets_tools/FORMAT.md``)::

    zarr.json                 root group; attributes below
    plan/unit_{k:06d}.json    samples owned by unit k (written once, never changed)
    commits/unit_{k:06d}.json commit record of unit k: counts per bucket, errors, warnings
    b{H}x{W}/                 one group per bucket (encoder input H×W pixels)
        latents   (N,16,H/32,W/32) float16|float32, shards (S,…), chunks (1,…)
        id, source, caption   (N,) str, shards = chunks = (S,)
        orig_size (N,2) int32 (h, w);  crop_box (N,4) int32 (left, top, right, bottom)
        index     (M,) int64  rows holding samples, in plan order (written by finalise)
    errors/   id, source, reason (str) — skipped samples (written by finalise)
    warnings/ id, source, reason (str) — encoded samples with a problem (e.g. unreadable caption)

N = n_units·S. Unit k owns rows [k·S, (k+1)·S) of every bucket array, i.e. whole
shards, so writers never share a shard. A unit is visible only once its commit
record exists; readers use ``index`` (or, before finalisation, the commit records).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .sources import Sample

FORMAT = "cascade-codec-latents"
FORMAT_VERSION = 1
LATENT_CHANNELS = 16
BUCKET_RE = re.compile(r"^b(\d+)x(\d+)$")
IDENTITY_KEYS = ("format", "format_version", "encoder", "preprocess", "dtype", "latent_channels", "shard_size")
STRING_ARRAYS = ("id", "source", "caption")


class StoreError(Exception):
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

    def __init__(self, location: Location, group):
        self.location = location
        self.group = group
        self._complete_buckets: set[str] = set()

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, url: str | os.PathLike, storage_options: dict[str, Any] | None = None,
             mode: str = "r") -> "LatentStore":
        """Open an existing store (``mode`` "r" or "r+"); :class:`StoreError` if it is not one of ours."""
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
        return cls(loc, group)

    @classmethod
    def open_for_writing(cls, url: str | os.PathLike, identity: dict[str, Any],
                         storage_options: dict[str, Any] | None = None, create: bool = True) -> "LatentStore | None":
        """Open (after checking ``identity``) or create a store. Refuses foreign or incompatible outputs.

        With ``create=False`` a missing store gives ``None`` (dry runs write nothing).
        """
        import zarr

        loc = Location(url, storage_options)
        if loc.local and loc.path.exists() and not loc.path.is_dir():
            raise StoreError(f"{loc.url} is a file, not a latent store; choose another output path.")
        if loc.exists("zarr.json"):
            store = cls.open(url, storage_options, mode="r+")
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
        return cls(loc, group)

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes (a copy)."""
        return dict(self.group.attrs)

    @property
    def shard_size(self) -> int:
        """S: samples per unit and rows per shard."""
        return int(self.group.attrs["shard_size"])

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
        if diffs:
            raise StoreError(f"{self.location.url} was made with different settings:\n  " + "\n  ".join(diffs)
                             + "\nUse the same settings to resume or extend it, or write to a new output path.")

    # ----------------------------------------------------------------- plan
    def read_plan(self) -> list[list[Sample]]:
        """The planned units in order (unit k = element k)."""
        names = [n for n in self.location.list_names("plan") if _unit_of(n) is not None]
        units = sorted(_unit_of(n) for n in names)
        if units != list(range(len(units))):
            missing = sorted(set(range(max(units) + 1)) - set(units)) if units else []
            raise StoreError(f"{self.location.url}: plan/ is missing units {missing[:5]}; the store is damaged. "
                             "Encode into a new output path.")
        plan = []
        for k in units:
            obj = self.location.read_json(f"plan/{_unit_file(k)}")
            plan.append([Sample.from_json(d) for d in obj["samples"]])
        return plan

    def append_units(self, units: list[list[Sample]], first: int) -> None:
        """Persist new units ``first, first+1, …`` (each file written once, atomically)."""
        for i, samples in enumerate(units):
            k = first + i
            self.location.write_json(f"plan/{_unit_file(k)}",
                                     {"unit": k, "samples": [s.to_json() for s in samples]})

    # ----------------------------------------------------------------- arrays
    def bucket_names(self) -> list[str]:
        """Names of the bucket groups present."""
        return sorted(name for name in self.group.group_keys() if BUCKET_RE.match(name))

    def ensure_bucket(self, bucket: tuple[int, int], n_units: int):
        """The bucket's group with all its arrays, created with capacity ``n_units·S`` when absent.

        Any writer may create a bucket (``keep-aspect`` buckets are not known in advance);
        the metadata is fully determined by (bucket, n_units, S, dtype), so two writers
        creating the same bucket at once write identical documents.
        """
        import zarr.errors

        name = bucket_name(bucket)
        if name in self._complete_buckets:
            return self.group[name]
        try:
            g = self.group[name]
        except KeyError:
            try:
                g = self.group.create_group(name, attributes={"bucket": list(bucket)})
            except zarr.errors.ContainsGroupError:
                g = self.group[name]
        S, n = self.shard_size, n_units * self.shard_size
        lh, lw = bucket[0] // 32, bucket[1] // 32
        spec = {
            "latents": dict(shape=(n, LATENT_CHANNELS, lh, lw), shards=(S, LATENT_CHANNELS, lh, lw),
                            chunks=(1, LATENT_CHANNELS, lh, lw), dtype=self.group.attrs["dtype"], fill_value=0,
                            compressors=None),  # zstd saves ~8 % on real-scale latents but costs ~50 µs per read
            "orig_size": dict(shape=(n, 2), shards=(S, 2), chunks=(S, 2), dtype="int32", fill_value=0),
            "crop_box": dict(shape=(n, 4), shards=(S, 4), chunks=(S, 4), dtype="int32", fill_value=0),
        }
        for key in STRING_ARRAYS:
            spec[key] = dict(shape=(n,), shards=(S,), chunks=(S,), dtype=str, fill_value="")
        existing = set(g.array_keys())
        for key, kw in spec.items():
            if key not in existing:
                try:
                    g.create_array(key, **kw)
                except zarr.errors.ContainsArrayError:
                    pass
        self._complete_buckets.add(name)
        return g

    def set_capacity(self, n_units: int, buckets: Iterable[tuple[int, int]] = ()) -> None:
        """Planner only: create ``buckets`` and grow every bucket array to ``n_units·S`` rows."""
        for b in buckets:
            self.ensure_bucket(b, n_units)
        n = n_units * self.shard_size
        for name in self.bucket_names():
            g = self.group[name]
            for key in ("latents", "orig_size", "crop_box", *STRING_ARRAYS):
                a = g[key]
                if a.shape[0] < n:
                    a.resize((n, *a.shape[1:]))
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
            lat = np.zeros(g["latents"].shape[1:], dtype=g["latents"].dtype)
            latents = np.zeros((S, *lat.shape), dtype=lat.dtype)
            latents[:count] = np.asarray(data["latents"], dtype=lat.dtype)
            g["latents"][sl] = latents
            for key, width in (("orig_size", 2), ("crop_box", 4)):
                arr = np.zeros((S, width), dtype=np.int32)
                arr[:count] = np.asarray(data[key], dtype=np.int32).reshape(count, width)
                g[key][sl] = arr
            for key in STRING_ARRAYS:
                g[key][sl] = np.array(list(data[key]) + [""] * (S - count), dtype=object)

    # ----------------------------------------------------------------- commits
    def commit(self, k: int, record: dict[str, Any]) -> None:
        """Make unit ``k`` visible: write its commit record atomically."""
        self.location.write_json(f"commits/{_unit_file(k)}", {"unit": k, "time": time.time(), **record})

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
        for table, items in (("errors", errors), ("warnings", warnings)):
            g = self.group.require_group(table)
            for col, key in enumerate(("id", "source", "reason")):
                a = g.create_array(key, shape=(len(items),), chunks=(max(1, min(len(items), 1 << 14)),), dtype=str,
                                   fill_value="", overwrite=True)
                if items:
                    a[:] = np.array([it[col] for it in items], dtype=object)
        complete = set(records) >= set(range(n_units))
        summary = {"count": sum(counts.values()), "buckets": counts, "errors": len(errors),
                   "warnings": len(warnings), "complete": complete, "n_units": n_units}
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

    def table(self, name: str) -> list[tuple[str, str, str]]:
        """The ``errors`` or ``warnings`` table as (id, source, reason) rows (finalised stores)."""
        if name not in self.group.group_keys():
            return []
        g = self.group[name]
        cols = [g[k][:].tolist() if g[k].shape[0] else [] for k in ("id", "source", "reason")]
        return list(zip(*cols))


def store_info(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> str:
    """A human-readable summary of a store (for ``cascade info STORE``)."""
    store = LatentStore.open(url, storage_options)
    a = store.attrs
    rows = store.visible_rows()
    lines = [f"latent store: {store.location.url}",
             f"  format: {a['format']} v{a['format_version']}  ({a.get('tool', '?')})",
             f"  encoder: {a['encoder'].get('file')} sha256 {a['encoder'].get('sha256', '')[:16]}…",
             f"  preprocess: {json.dumps(a['preprocess'], sort_keys=True)}",
             f"  dtype: {a['dtype']}  shard size: {a['shard_size']}",
             f"  samples: {sum(len(r) for r in rows.values())}"
             + ("" if a.get("complete") else "  (INCOMPLETE: not finalised; run encode-dataset again to finish)")]
    for name, r in rows.items():
        h, w = parse_bucket(name)
        lines.append(f"    {name}: {len(r)} samples, latents 16×{h // 32}×{w // 32}")
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
