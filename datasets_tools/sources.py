"""Sample sources: a folder tree, a manifest (CSV/JSONL) or webdataset-style tar shards.

Every source lists :class:`Sample` records in a deterministic order with stable,
unique ids. A sample is plain data (it pickles and serialises to JSON), so a plan can
be written once and processed later by any process: :meth:`Sample.read_bytes` fetches
the image bytes and :meth:`Sample.read_caption` the caption, wherever they live.

Every source has a root (:func:`source_root`: the folder, the manifest's folder, or the
folder of the tar shards). ``Sample.source`` names the input relative to that root, and
plan files store locations relative to it (:meth:`Sample.to_json`), so a store and its
plan survive moving the dataset: run the job on the new place and the plan resolves
against it. Paths outside the root and URLs elsewhere stay absolute.

Sources:

- **folder** (recursive): extensions ``jpg jpeg png webp bmp tif tiff`` (any case),
  sorted by relative POSIX path; id = relative path without extension (with the
  extension when two files differ only by it); caption from a sidecar ``NAME.txt``
  (UTF-8) or ``NAME.json`` (``caption`` or ``text`` key).
- **manifest**: ``.csv`` (with a header) or ``.jsonl``; columns ``path`` or ``url``,
  optional ``caption`` and ``id``. Relative paths are resolved against the manifest's folder.
- **tar shards**: ``.tar`` files (local paths, brace patterns ``shards-{000..009}.tar``,
  fsspec URLs); members grouped by key = basename up to the first dot; the image member
  plus an optional ``.txt``/``.json`` caption; id = ``<shard name>/<key>``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from codec.errors import CascadeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".json")


class SourceError(CascadeError):
    """A source cannot be listed (missing, empty, malformed); the message names it and the fix."""


@dataclass(frozen=True)
class Sample:
    """One input image.

    ``source`` names it relative to the source root (a relative POSIX path, or
    ``shard.tar::member``; absolute paths and URLs for inputs outside the root). The bytes
    are at ``location`` (an absolute path or URL), from ``offset`` for ``size`` bytes when it is a
    tar member (``size=-1``: the whole file). The caption is ``caption`` when given
    inline, else read from ``caption_file`` (a sidecar) when there is one;
    ``caption_error`` records why an inline caption could not be read at listing time.
    """

    id: str
    source: str
    location: str
    offset: int = 0
    size: int = -1
    caption: str | None = None
    caption_file: str | None = None
    caption_error: str | None = None

    def to_json(self, root: str | None = None) -> dict[str, Any]:
        """Plain-dict form (for plan files); with ``root``, ``location``/``caption_file`` relative to it."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if root is not None:
            for key in _PATH_FIELDS:
                if key in d:
                    d[key] = relative_to_root(d[key], root)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], root: str | None = None) -> "Sample":
        """Inverse of :meth:`to_json`: relative locations are resolved against ``root`` (absolute ones kept)."""
        d = dict(d)
        if root is not None:
            for key in _PATH_FIELDS:
                if key in d:
                    d[key] = resolve_from_root(d[key], root)
        return cls(**d)

    def read_bytes(self) -> bytes:
        """The image file's bytes (raises ``OSError`` when unreadable)."""
        return _read_range(self.location, self.offset, self.size)

    def read_caption(self) -> tuple[str, str | None]:
        """``(caption, warning)``: the caption ("" when none), and a reason when it could not be read."""
        if self.caption_error is not None:
            return "", self.caption_error
        if self.caption is not None:
            return self.caption, None
        if self.caption_file is None:
            return "", None
        try:
            return parse_caption(_read_range(self.caption_file, 0, -1), self.caption_file), None
        except (OSError, ValueError) as e:
            return "", f"caption {self.caption_file} unreadable: {e}"


_PATH_FIELDS = ("location", "caption_file")


def relative_to_root(path: str, root: str) -> str:
    """``path`` as a POSIX path relative to ``root`` when it lies inside it, else unchanged."""
    if _is_url(root) or _is_url(path):
        prefix = root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path
    if not os.path.isabs(path):
        return path
    path, root = os.path.normpath(path), os.path.normpath(root)
    if os.path.commonpath([path, root]) != root:
        return path
    return PurePosixPath(Path(os.path.relpath(path, root))).as_posix()


def resolve_from_root(path: str, root: str) -> str:
    """Inverse of :func:`relative_to_root`: absolute paths and URLs unchanged, relative ones joined to ``root``."""
    if _is_url(path) or os.path.isabs(path) or path.startswith("file://"):
        return path
    if _is_url(root):
        return f"{root.rstrip('/')}/{path}"
    return os.path.join(root, *PurePosixPath(path).parts)


def parse_caption(data: bytes, name: str) -> str:
    """Caption from a ``.txt`` (UTF-8, stripped) or ``.json`` (``caption`` or ``text`` key) file's bytes."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if name.lower().endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(obj, dict):
            raise ValueError("JSON caption files must hold an object with a 'caption' or 'text' key")
        for key in ("caption", "text"):
            if isinstance(obj.get(key), str):
                return obj[key].strip()
        raise ValueError("no string 'caption' or 'text' key")
    return text.strip()


def _is_url(s: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s)) and not s.startswith("file://")


def _read_range(location: str, offset: int, size: int) -> bytes:
    if _is_url(location):
        import fsspec

        with fsspec.open(location, "rb") as f:
            if offset:
                f.seek(offset)
            return f.read() if size < 0 else f.read(size)
    path = location[len("file://"):] if location.startswith("file://") else location
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        return f.read() if size < 0 else f.read(size)


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` and ``{000..009}`` (zero padding kept) brace patterns, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.startswith("0") or b.startswith("0") else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


# --------------------------------------------------------------------------- folder
def _dedupe(ids: list[str], alternatives: list[str]) -> list[str]:
    """Replace ids that occur more than once by their alternative (e.g. with the extension)."""
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    return [alt if counts[i] > 1 else i for i, alt in zip(ids, alternatives)]


def list_folder(root: str | os.PathLike) -> list[Sample]:
    """Images under ``root`` (recursive), sorted by relative POSIX path, with sidecar captions."""
    root = Path(root).expanduser().absolute()  # plans outlive the working directory
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder")
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                rels.append(PurePosixPath(Path(dirpath).relative_to(root).as_posix(), name).as_posix())
    rels.sort()
    stems = [r.rsplit(".", 1)[0] for r in rels]
    ids = _dedupe(stems, rels)
    samples = []
    for rel, stem, sid in zip(rels, stems, ids):
        path = root / rel
        caption_file = None
        for ext in CAPTION_EXTENSIONS:
            side = root / (stem + ext)
            if side.is_file():
                caption_file = str(side)
                break
        samples.append(Sample(id=sid, source=rel, location=str(path), caption_file=caption_file))
    return samples


# --------------------------------------------------------------------------- manifest
def _manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the manifest as UTF-8") \
            from None
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}, line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}, line {n}: each line must be a JSON object")
            yield n, row
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not ({"path", "url"} & set(reader.fieldnames)):
            raise SourceError(f"{path}: the CSV header must name a 'path' or 'url' column (found "
                              f"{reader.fieldnames})")
        for n, row in enumerate(reader, 2):
            yield n, row


def list_manifest(path: str | os.PathLike) -> list[Sample]:
    """Samples of a CSV (with header) or JSONL manifest, in file order."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise SourceError(f"{path}: no such manifest file")
    base = path.parent
    samples, ids, alts = [], [], []
    explicit: dict[str, int] = {}
    for n, row in _manifest_rows(path):
        loc = row.get("path") or row.get("url")
        if not loc:
            raise SourceError(f"{path}, line {n}: no 'path' or 'url' value")
        loc = str(loc)
        if not _is_url(loc) and not os.path.isabs(loc):
            loc = str(base / loc)
        caption = row.get("caption")
        caption = "" if caption is None else str(caption)
        if row.get("id") not in (None, ""):
            sid = str(row["id"])
            if sid in explicit:
                raise SourceError(f"{path}, line {n}: id {sid!r} already used on line {explicit[sid]}; ids must be "
                                  "unique")
            explicit[sid] = n
            alt = sid
        else:
            raw = str(row.get("path") or row.get("url"))
            sid = raw.split("://", 1)[-1].rsplit(".", 1)[0] if "." in PurePosixPath(raw).name else raw
            alt = f"{raw}#L{n}"
        ids.append(sid)
        alts.append(alt)
        samples.append(Sample(id=sid, source=relative_to_root(loc, str(base)), location=loc, caption=caption))
    final = _dedupe(ids, alts)
    if len(set(final)) != len(final):
        raise SourceError(f"{path}: derived sample ids collide with explicit ids; give every row an 'id'")
    return [Sample(**{**s.to_json(), "id": i}) for s, i in zip(samples, final)]


# --------------------------------------------------------------------------- tar shards
def _open_tar(url: str):
    if _is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def list_tar(url: str, root: str | None = None) -> list[Sample]:
    """Samples of one webdataset-style tar shard (members grouped by key = name up to the first dot).

    ``source`` is ``<shard path relative to root>::<member>`` (the shard's folder by default).
    """
    root = root if root is not None else _parent(url)
    rel = relative_to_root(url, root)
    name = PurePosixPath(url.split("://", 1)[-1]).name
    shard = name[:-4] if name.lower().endswith(".tar") else name
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        fobj = _open_tar(url)
    except (OSError, ValueError) as e:
        raise SourceError(f"{url}: cannot open tar shard ({e})") from None
    with fobj, tarfile.open(fileobj=fobj, mode="r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = PurePosixPath(m.name)
            if base.name.startswith("."):
                continue
            stem, _, rest = base.name.partition(".")
            key = stem if str(base.parent) == "." else f"{base.parent}/{stem}"
            ext = "." + rest.lower() if rest else ""
            groups.setdefault(key, {})[ext] = m
        samples = []
        for key in sorted(groups):
            members = groups[key]
            image = next((members[e] for e in sorted(members) if e.endswith(IMAGE_EXTENSIONS)), None)
            if image is None:
                continue
            caption, error = "", None
            for ext in CAPTION_EXTENSIONS:
                if ext in members:
                    f = tf.extractfile(members[ext])
                    try:
                        caption = parse_caption(f.read() if f else b"", ext)
                    except ValueError as e:
                        error = f"caption {url}::{members[ext].name} unreadable: {e}"
                    break
            sample = Sample(id=f"{shard}/{key}", source=f"{rel}::{image.name}", location=url,
                            offset=image.offset_data, size=image.size, caption=caption, caption_error=error)
            samples.append(sample)
    return samples


# --------------------------------------------------------------------------- dispatch
def _is_tar_source(s: str) -> bool:
    low = s.lower()
    return low.endswith(".tar") or ("{" in s and ".tar" in low)


def _tar_urls(s: str) -> list[str]:
    return [u if _is_url(u) else str(Path(u).expanduser().absolute()) for u in expand_braces(s)]


def _parent(path: str) -> str:
    if _is_url(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(path)


def source_root(source: str | os.PathLike) -> str:
    """The folder (or URL prefix) that ``Sample.source`` and plan locations are relative to.

    A folder: itself; a manifest: its folder; tar shards: the deepest folder holding all of
    them. Absolute (``~`` expanded), computed from the argument alone (nothing is listed).
    """
    s = str(source)
    if _is_tar_source(s):
        parents = sorted({_parent(u) for u in _tar_urls(s)})
        if len(parents) == 1 or not _is_url(parents[0]):
            return os.path.commonpath(parents) if len(parents) > 1 else parents[0]
        scheme = parents[0].split("://", 1)[0]
        return f"{scheme}://" + posixpath.commonpath([p.split("://", 1)[1] for p in parents])
    path = str(Path(s).expanduser().absolute()) if not _is_url(s) else s
    if s.lower().endswith((".csv", ".jsonl")):
        return _parent(path)
    return path


def list_source(source: str | os.PathLike, limit: int | None = None) -> list[Sample]:
    """List a folder, a manifest (``.csv``/``.jsonl``), or tar shards (``.tar``, brace patterns, URLs).

    Order is deterministic and ids are unique; ``limit`` keeps the first ``limit`` samples.
    ``Sample.source`` is relative to :func:`source_root`.
    """
    s = str(source)
    low = s.lower()
    if _is_tar_source(s):
        urls = _tar_urls(s)
        for u in urls:
            if not _is_url(u) and not os.path.isfile(u):
                raise SourceError(f"{u}: no such tar shard" + (f" (from the pattern {s})" if len(urls) > 1 else ""))
        root = source_root(s)
        samples = [x for u in urls for x in list_tar(u, root)]
    elif low.endswith((".csv", ".jsonl")):
        samples = list_manifest(s)
    elif _is_url(s):
        raise SourceError(f"{s}: remote sources must be tar shards (.tar, brace patterns allowed)")
    elif os.path.isdir(s):
        samples = list_folder(s)
    elif os.path.exists(s):
        raise SourceError(f"{s}: not a folder, a .csv/.jsonl manifest or a .tar shard")
    else:
        raise SourceError(f"{s}: no such folder or file")
    seen: dict[str, str] = {}
    for x in samples:
        if x.id in seen:
            raise SourceError(f"{s}: two samples have the id {x.id!r} ({seen[x.id]} and {x.source}); ids must be "
                              "unique")
        seen[x.id] = x.source
    return samples[:limit] if limit is not None else samples
