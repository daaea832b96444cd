"""Report files: the per-image CSV (resumable), the summary JSON (versioned schema), the Markdown table, compare.

``per_image.csv`` has one row per (image, codec), written as soon as it is measured, in
image order; floats are written with ``repr`` so reading them back gives the same numbers;
an empty cell means "not computed" (never 0). ``warmup`` is 1 on the first image a process
measured (first calls include one-off set-up costs); the seconds per image in the summary
leave those rows out unless there are no others. ``summary.json`` is computed from the CSV
by streaming it (plus the rFID statistics), so memory does not grow with the number of
images. Its layout is checked by :func:`validate_summary` (schema ``SCHEMA`` version
``SCHEMA_VERSION``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

from codec.errors import MissingInputError, UsageError
from codec.files import atomic_write

SCHEMA = "cascade-codec/bench-recon"
SCHEMA_VERSION = 1
CSV_NAME, SUMMARY_NAME, TABLE_NAME = "per_image.csv", "summary.json", "table.md"
GRID_DIR, PLOT_FILE, HTML_NAME = "grid_images", "rate_quality.png", "report.html"
COLUMNS = ("image_index", "image_id", "codec", "codec_title", "height", "width", "bytes", "bpp",
           "compression_ratio", "psnr", "ssim", "ms_ssim", "lpips", "encode_s", "decode_s", "peak_memory_bytes",
           "orig_height", "orig_width", "crop_box", "warmup", "extra")
INT_COLUMNS = ("image_index", "height", "width", "bytes", "peak_memory_bytes", "orig_height", "orig_width",
               "warmup")
FLOAT_COLUMNS = ("bpp", "compression_ratio", "psnr", "ssim", "ms_ssim", "lpips", "encode_s", "decode_s")
QUALITY = ("psnr", "ssim", "ms_ssim", "lpips")
# metric key → (table heading, higher is better)
METRIC_NAMES = {"psnr": ("PSNR dB", True), "ssim": ("SSIM", True), "ms_ssim": ("MS-SSIM", True),
                "lpips": ("LPIPS", False), "rfid": ("rFID", False)}


def grid_image_name(index: int, label: str | None = None) -> str:
    """File name, in :data:`GRID_DIR`, of image ``index``'s original (``label`` None) or of one codec's
    reconstruction: readable, safe in any file system, and unique per label (a hash of it ends the name)."""
    if label is None:
        return f"{index:05d}_original.png"
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", label)[:60] + "-" + hashlib.sha1(label.encode()).hexdigest()[:6]
    return f"{index:05d}_{slug}.png"


# --------------------------------------------------------------------------- CSV
def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _parse(key: str, v: str) -> Any:
    if v == "":
        return None
    if key in INT_COLUMNS:
        return int(v)
    if key in FLOAT_COLUMNS:
        return float(v)
    if key in ("crop_box", "extra"):
        return json.loads(v)
    return v


class CsvWriter:
    """Appends rows to the per-image CSV (header written when the file is new), flushed row by row."""

    def __init__(self, path: Path):
        new = not path.exists() or path.stat().st_size == 0
        self.f = open(path, "a", newline="", encoding="utf-8")
        self.w = csv.DictWriter(self.f, fieldnames=COLUMNS)
        if new:
            self.w.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        """Write one row (keys from :data:`COLUMNS`; missing keys are empty)."""
        self.w.writerow({k: _cell(row.get(k)) for k in COLUMNS})
        self.f.flush()

    def close(self) -> None:
        """Flush and close."""
        self.f.close()


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a per-image CSV with typed values (``None`` for empty cells), streamed."""
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            yield {k: _parse(k, row.get(k, "") or "") for k in COLUMNS}


def truncate_rows(path: Path, images_done: int) -> int:
    """Keep only rows of images ``< images_done`` (rows of a half-finished image go); returns rows kept."""
    if not path.exists():
        return 0
    kept = 0
    with atomic_write(path) as tmp, open(path, newline="", encoding="utf-8") as src, \
            open(tmp, "w", newline="", encoding="utf-8") as dst:
        reader, writer = csv.DictReader(src), csv.DictWriter(dst, fieldnames=COLUMNS)
        writer.writeheader()
        for row in reader:
            if row.get("image_index") not in (None, "") and int(row["image_index"]) < images_done:
                writer.writerow({k: row.get(k, "") for k in COLUMNS})
                kept += 1
    return kept


# --------------------------------------------------------------------------- aggregation
class _Running:
    """Count, mean and standard deviation of a stream (Welford)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def result(self) -> dict[str, Any] | None:
        if not self.n:
            return None
        std = math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0
        return {"mean": self.mean, "std": std, "n": self.n}


def aggregate(path: Path, labels: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-codec statistics from the CSV, and per-image facts (count, sizes, how many were resized/upscaled)."""
    keys = ("bytes", "bpp") + QUALITY + ("encode_s", "decode_s")
    stats = {label: {k: _Running() for k in keys} for label in labels}
    warm = {label: {k: _Running() for k in ("encode_s", "decode_s")} for label in labels}
    raw = {label: [0, 0] for label in labels}  # raw RGB bytes, coded bytes
    peak = {label: 0 for label in labels}
    extras: dict[str, dict[str, Any]] = {label: {} for label in labels}
    images: dict[str, Any] = {"n": 0, "resized": 0, "upscaled": 0, "sizes": set()}
    last_image = -1
    for row in read_rows(path) if path.exists() else ():
        label = row["codec"]
        if label not in stats:
            continue
        for k in keys:
            if row[k] is not None:
                (warm if row["warmup"] and k in warm[label] else stats)[label][k].add(float(row[k]))
        raw[label][0] += 3 * row["height"] * row["width"]
        raw[label][1] += row["bytes"]
        peak[label] = max(peak[label], row["peak_memory_bytes"] or 0)
        for k, v in (row["extra"] or {}).items():
            if isinstance(v, bool):
                extras[label][k] = extras[label].get(k, 0) + int(v)
            elif isinstance(v, (int, float)):
                extras[label].setdefault(k, _Running()).add(float(v))
        if row["image_index"] != last_image:
            last_image = row["image_index"]
            images["n"] += 1
            images["sizes"].add((row["height"], row["width"]))
            if (row["orig_height"], row["orig_width"]) != (row["height"], row["width"]):
                images["resized"] += 1
            if min(row["orig_height"], row["orig_width"]) < min(row["height"], row["width"]):
                images["upscaled"] += 1
    out = {}
    for label in labels:
        s = {k: r.result() or (warm[label][k].result() if k in warm[label] else None)
             for k, r in stats[label].items()}
        out[label] = {
            "n": s["bytes"]["n"] if s["bytes"] else 0,
            "bytes_mean": s["bytes"]["mean"] if s["bytes"] else None,
            "bpp_mean": s["bpp"]["mean"] if s["bpp"] else None,
            "compression_ratio": raw[label][0] / raw[label][1] if raw[label][1] else None,
            **{k: s[k] for k in QUALITY},
            "encode_s_per_image": s["encode_s"]["mean"] if s["encode_s"] else None,
            "decode_s_per_image": s["decode_s"]["mean"] if s["decode_s"] else None,
            "peak_memory_bytes": peak[label] or None,
            "extra": {k: (v.result()["mean"] if isinstance(v, _Running) else v) for k, v in extras[label].items()},
        }
    images["sizes"] = sorted(list(s) for s in images["sizes"])
    return out, images


# --------------------------------------------------------------------------- summary schema
TOP_KEYS = {"schema": str, "schema_version": int, "created": str, "tool": str, "config": dict, "dataset": dict,
            "protocol": dict, "metrics": dict, "codecs": list, "skipped": list, "environment": dict, "files": dict}
DATASET_KEYS = ("path", "kind", "n", "resolution", "crop", "resize_kernel")
CODEC_KEYS = ("label", "title", "family", "params", "n", "bytes_mean", "bpp_mean", "compression_ratio", "psnr",
              "ssim", "ms_ssim", "lpips", "rfid", "encode_s_per_image", "decode_s_per_image", "peak_memory_bytes")


def validate_summary(d: Any, name: str = "summary") -> dict[str, Any]:
    """Check a summary against the schema; returns it, or raises ``ValueError`` naming the first problem."""
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise UsageError(f"{name} is not a cascade bench recon summary (schema {SCHEMA!r} missing)")
    if not isinstance(d.get("schema_version"), int) or d["schema_version"] > SCHEMA_VERSION:
        raise UsageError(f"{name} has schema version {d.get('schema_version')!r}; this tool reads up to "
                         f"{SCHEMA_VERSION}. Upgrade cascade-codec.")
    for key, typ in TOP_KEYS.items():
        if not isinstance(d.get(key), typ):
            raise UsageError(f"{name}: {key!r} missing or not a {typ.__name__}")
    for key in DATASET_KEYS:
        if key not in d["dataset"]:
            raise UsageError(f"{name}: dataset.{key} missing")
    for i, c in enumerate(d["codecs"]):
        for key in CODEC_KEYS:
            if not isinstance(c, dict) or key not in c:
                raise UsageError(f"{name}: codecs[{i}].{key} missing")
        for key in QUALITY:
            v = c[key]
            if v is not None and not (isinstance(v, dict) and {"mean", "std", "n"} <= set(v)):
                raise UsageError(f"{name}: codecs[{i}].{key} must be null or {{mean, std, n}}")
        if c["rfid"] is not None and not isinstance(c["rfid"], (int, float)):
            raise UsageError(f"{name}: codecs[{i}].rfid must be null or a number")
    for key in ("psnr", "ssim", "ms_ssim", "lpips", "rfid"):
        if not isinstance(d["metrics"].get(key), dict) or "available" not in d["metrics"][key]:
            raise UsageError(f"{name}: metrics.{key} missing")
    return d


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A summary from a report folder or its ``summary.json``, validated."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_NAME
    if not p.is_file():
        raise MissingInputError(f"{p}: no such file; give a report folder written by `cascade bench recon` or its "
                                f"{SUMMARY_NAME}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return validate_summary(d, str(p))


# --------------------------------------------------------------------------- Markdown
def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        v = v["mean"]
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"


def _mem(b: Any) -> str:
    return "n/a" if not b else f"{b / 2**30:.2f} GB"


def _sec(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def header_lines(s: dict[str, Any]) -> list[str]:
    """What every report states: dataset, N, resolution, crop, resize kernel, weights, seed, protocol."""
    d = s["dataset"]
    lines = [f"dataset: {d['path']} ({d['kind']}), N = {d['n']} images"
             + (f" ({len(s['skipped'])} unreadable, skipped)" if s["skipped"] else "")
             + f", resolution {d['resolution']}",
             f"crop: {d['crop']}; resize kernel: {d['resize_kernel']}"
             + (f"; {d.get('n_resized', 0)} resized ({d.get('n_upscaled', 0)} upscaled)" if d["kind"] != "store"
                else ""),
             f"seed {s['config'].get('seed')}; {s['protocol']['quantisation']}"]
    weights = {json.dumps(c.get("weights"), sort_keys=True): c for c in s["codecs"] if c["family"] == "sc"}
    for c in weights.values():
        w = c.get("weights") or {}
        if w.get("tiny_random"):
            lines.append(f"Stable Cascade weights: TINY RANDOM WEIGHTS from {w.get('source')} (untrained stand-ins "
                         "for the real models: their numbers say nothing about Stable Cascade's quality)")
        else:
            lines.append(f"Stable Cascade weights: {w.get('source')} (Stage B {c['params'].get('stage_b')}, "
                         f"{w.get('precision') or w.get('stage_b_dtype')})")
    return lines


def markdown_table(s: dict[str, Any]) -> str:
    """The Markdown report: header lines, one row per codec, then the metrics that were not computed."""
    lpips_name = "LPIPS-" + s["config"].get("lpips_net", "alex")
    lines = header_lines(s) + [""]
    cols = ["codec", "bytes", "bpp", "ratio", "PSNR dB", "SSIM", "MS-SSIM", lpips_name, "rFID", "enc s/img",
            "dec s/img", "peak mem"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
    for c in s["codecs"]:
        cells = [c["title"], _num(c["bytes_mean"], 0), _num(c["bpp_mean"], 4), _num(c["compression_ratio"], 1),
                 _num(c["psnr"], 2), _num(c["ssim"], 4), _num(c["ms_ssim"], 4), _num(c["lpips"], 4),
                 _num(c["rfid"], 2), _sec(c["encode_s_per_image"]), _sec(c["decode_s_per_image"]),
                 _mem(c["peak_memory_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    missing_metrics = [m for m in s["metrics"].values() if not m["available"]]
    if missing_metrics:
        lines.append("")
        lines += [f"- {m['message']}" for m in missing_metrics]
    notes = [f"- {c['label']}: {n}" for c in s["codecs"] for n in c.get("notes", [])]
    if notes:
        lines.append("")
        lines += notes
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- compare
def compare(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """Markdown deltas (B − A) of every codec present in both summaries, plus what differs between the runs."""
    lines = [f"A = {name_a}", f"B = {name_b}"]
    for key in ("path", "n", "resolution", "crop", "resize_kernel"):
        if a["dataset"].get(key) != b["dataset"].get(key):
            lines.append(f"note: dataset {key} differs: A {a['dataset'].get(key)!r}, B {b['dataset'].get(key)!r}")
    for key in sorted(set(a["config"]) | set(b["config"])):
        if key not in ("output", "codecs", "limit") and a["config"].get(key) != b["config"].get(key):
            lines.append(f"note: option {key} differs: A {a['config'].get(key)!r}, B {b['config'].get(key)!r}")
    ca, cb = {c["label"]: c for c in a["codecs"]}, {c["label"]: c for c in b["codecs"]}
    both = [label for label in ca if label in cb]
    metrics = ["bpp_mean", "psnr", "ssim", "ms_ssim", "lpips", "rfid", "encode_s_per_image", "decode_s_per_image"]
    heads = ["bpp", "PSNR dB", "SSIM", "MS-SSIM", "LPIPS", "rFID", "enc s/img", "dec s/img"]
    lines += ["", "| codec | " + " | ".join(f"{h} A → B (Δ)" for h in heads) + " |",
              "|---|" + "---:|" * len(heads)]
    for label in both:
        cells = []
        for m in metrics:
            va, vb = _mean(ca[label][m]), _mean(cb[label][m])
            if va is None and vb is None:
                cells.append("n/a")
            elif va is None or vb is None:
                cells.append(f"{_fmt(va)} → {_fmt(vb)}")
            else:
                cells.append(f"{_fmt(va)} → {_fmt(vb)} ({vb - va:+.4g})")
        title = cb[label]["title"] if ca[label]["title"] == cb[label]["title"] else \
            f"{label} (A: {ca[label]['title']}; B: {cb[label]['title']})"
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    only_a, only_b = [x for x in ca if x not in cb], [x for x in cb if x not in ca]
    if only_a:
        lines.append(f"\nonly in A: {', '.join(only_a)}")
    if only_b:
        lines.append(f"{'' if only_a else chr(10)}only in B: {', '.join(only_b)}")
    return "\n".join(lines) + "\n"


def _mean(v: Any) -> float | None:
    return v["mean"] if isinstance(v, dict) else v


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"
