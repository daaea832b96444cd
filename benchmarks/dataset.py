"""Throughput of the latent-dataset tools: encoding pipeline vs model-only, random reads, store size.

Run ``python -m benchmarks.dataset --help`` for the options. What is measured, in one run:

1. **Encoding pipeline vs model-only** on a folder of ≥200 real JPEG photos of 1024 px and
   larger (``--images``, or a corpus built and cached by this script, see below):

   * *pipeline* = ``datasets_tools.encode.encode_dataset(folder, fresh_store, weights, ...)``
     end to end, cold: listing, planning, loading the encoder, JPEG decoding and resizing in
     ``--workers`` DataLoader processes, encoding, writing and committing units, finalising.
     images/s = encoded images / wall seconds of the call.
   * *model-only* = the same encoder (``codec.codec.load_encoder``) called through
     ``codec.codec.encode_pixels`` on the same images, already decoded and preprocessed the
     same way (``decode_image`` + ``preprocess``) and held in memory, in batches of the same
     size, after one warm-up batch. Only the ``encode_pixels`` calls are timed.

   The ratio pipeline / model-only is the share of the encoder's speed the job keeps
   (goal ≥ 90 %). Both runs use ``torch.set_num_threads(--threads)`` in this process; the
   pipeline's decode workers compete with the encoder for the same cores, which is the point.

2. **Random-access reads**: a local store of ``--read-samples`` random float16 latents
   (16×S/32×S/32) is written through the store API (``LatentStore`` plan → capacity →
   ``write_unit`` → ``commit`` → ``finalise``, exactly what ``encode_dataset`` does, minus
   the encoder), then ``LatentDataset(store)[i]`` is timed over a seeded shuffled permutation
   of all indices in this one process (goal ≥ 20,000 samples/s; ``--read-passes`` passes,
   best pass reported, all in the JSON), and a ``DataLoader`` over
   ``BucketBatchSampler(shuffle=True, batch_size=--read-batch-size)`` with 0 and 2 workers
   (one epoch each, including worker start-up). The same single-process read is also
   timed on the (small) store of step 1, with real latents.

3. **Store size**: bytes on disk of the step-1 store (real latents) and of the step-2
   store, divided by the sample count; whole store and latents array alone.

Corpus (when ``--images`` is not given): large real photos are looked up offline in
``--photos`` globs (default: Debian mate-backgrounds ``/usr/share/backgrounds/mate/nature``,
lomiri-wallpapers ``/usr/share/backgrounds/*_by_*.jpg``, and ``scripts/samples``); sources
whose short side is ≥ 1024 px are used (two non-photographic wallpapers, ``NOT_PHOTOS``, are
skipped). ``--n`` distinct crops (seeded random position and
scale, each side 1024–1400 px, downscaled when the crop is larger) are saved as JPEG quality
90 into ``--corpus-dir`` with ``corpus.json`` recording each crop's source file and box; the
folder is reused when its manifest matches (same seed and sources, at least ``--n`` crops; crop k depends only on the
seed, the sources and k). When no source is large enough, the sample photos
are upscaled instead and the output says so (upscaled photos decode and encode at the same
cost but are not real 1024-px photos).

Weights: by default tiny random weights from ``codec.tiny.write_tiny_weights`` in a temporary
folder. Its EfficientNetV2-S encoder is the full-size architecture, so encoder throughput
is representative; the latents are meaningless (irrelevant here).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.environment import device_arg, environment_record
from datasets_tools.crops import cut, random_crop_boxes

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "dataset.json"
DEFAULT_CORPUS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cascade-codec" / "bench-photos"
DEFAULT_PHOTOS = ("/usr/share/backgrounds/mate/nature/*.jpg", "/usr/share/backgrounds/*_by_*.jpg",
                  str(ROOT / "scripts" / "samples" / "*.jpg"))
# Wallpapers in those packages that are not photographs (a synthetic gradient, a noise texture); never used.
NOT_PHOTOS = ("umang_by_Abhishek_Mudgal.jpg", "analogpattern_by_Peter_Nerlich.jpg")
CORPUS_VERSION = 2  # 2: crops drawn by datasets_tools.crops (other boxes than 1)
MIN_SIDE, MAX_SIDE = 1024, 1400


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------
def _image_size(path: str) -> tuple[int, int] | None:
    """``(w, h)`` of the upright photo (crop boxes are drawn before it is decoded and turned by its EXIF)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations with a 90° turn
            return (im.height, im.width) if turned else im.size
    except Exception:  # noqa: BLE001 - an unreadable candidate is just not used
        return None


def build_corpus(folder: Path, n: int, photo_globs: list[str], seed: int) -> dict[str, Any]:
    """Cut ``n`` distinct JPEG crops (sides 1024–1400 px) from the large photos matched by ``photo_globs``.

    Returns the corpus manifest (also written to ``folder/corpus.json``); reuses the folder when
    its manifest was made with the same settings and all files are present.
    """
    from PIL import Image, ImageOps

    candidates = sorted({os.path.realpath(p) for g in photo_globs for p in glob.glob(os.path.expanduser(g))
                         if os.path.basename(p) not in NOT_PHOTOS})
    sizes = {p: s for p in candidates if (s := _image_size(p)) is not None}
    large = [p for p, (w, h) in sizes.items() if min(w, h) >= MIN_SIDE]
    upscaled = not large
    sources = large if large else sorted(sizes)
    if not sources:
        raise SystemExit(f"no photos found for the corpus in {photo_globs}; pass --images DIR or --photos GLOB")
    key = {"version": CORPUS_VERSION, "seed": seed, "sources": sources, "quality": 90,
           "sides": [MIN_SIDE, MAX_SIDE]}
    manifest_path = folder / "corpus.json"
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
            if (old.get("key") == key and len(old["files"]) >= n
                    and all((folder / f["file"]).exists() for f in old["files"])):
                # Crop k depends only on (seed, sources, k), so the first n crops of a bigger corpus are the same.
                log(f"corpus: reusing {len(old['files'])} photos in {folder} (first {n} used)")
                return old
        except (OSError, ValueError, KeyError):
            pass
    if folder.exists():
        for p in folder.glob("*.jpg"):
            p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    log(f"corpus: cutting {n} crops from {len(sources)} {'LARGE' if large else 'SMALL (upscaled!)'} source "
        f"photo(s) into {folder}")
    files = []
    opened: dict[str, Image.Image] = {}
    crops = random_crop_boxes([sizes[p] for p in sources], n, seed, side=(MIN_SIDE, MAX_SIDE),
                              scale=(0.7, 1.0) if upscaled else (0.0, 1.0), upscale=upscaled)
    for k, crop in enumerate(crops):
        src = sources[crop.source]
        if src not in opened:
            if len(opened) > 4:
                opened.pop(next(iter(opened))).close()
            opened[src] = ImageOps.exif_transpose(Image.open(src)).convert("RGB")
        name = f"crop_{k:04d}.jpg"
        cut(opened[src], crop, Image.Resampling.LANCZOS).save(folder / name, quality=90)
        files.append({"file": name, "source": src, "box": list(crop.box), "size": list(crop.size)})
    for im in opened.values():
        im.close()
    manifest = {"key": key, "upscaled": upscaled, "n_sources": len(sources), "files": files}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def describe_folder(folder: Path, n: int) -> dict[str, Any]:
    """Count, size range and bytes of the first ``n`` images of a folder (in the job's listing order)."""
    from datasets_tools.sources import list_source

    samples = list_source(folder, n)
    dims = [s for smp in samples if (s := _image_size(smp.location)) is not None]
    total = sum(os.path.getsize(smp.location) for smp in samples)
    return {"count": len(samples), "min_side": min((min(d) for d in dims), default=0),
            "max_side": max((max(d) for d in dims), default=0), "bytes": total, "samples": samples}


# --------------------------------------------------------------------------------------------
# 1. pipeline vs model-only
# --------------------------------------------------------------------------------------------
def model_only(weights: str, samples, policy: str, size: int, batch_size: int, device: str = "cpu") -> dict[str, Any]:
    from codec.codec import encode_pixels, load_encoder
    from datasets_tools.encode import SampleError, decode_image
    from datasets_tools.preprocess import preprocess

    t = time.perf_counter()
    pixels: list[torch.Tensor] = []
    skipped = 0
    for s in samples:
        try:
            pixels.append(preprocess(decode_image(s.read_bytes()), policy, size).pixels)
        except SampleError:
            skipped += 1
    decode_s = time.perf_counter() - t
    # One shape per batch as the job does it (center policy: a single shape).
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for p in pixels:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    t = time.perf_counter()
    model = load_encoder(weights, device)
    load_s = time.perf_counter() - t
    batches = [torch.stack(group[i:i + batch_size]) for group in by_shape.values()
               for i in range(0, len(group), batch_size)]
    del pixels, by_shape
    t = time.perf_counter()
    encode_pixels(model, batches[0])  # warm-up, not timed
    warm_s = time.perf_counter() - t
    times, cpu = [], 0.0
    for b in batches:
        t, c = time.perf_counter(), time.process_time()
        encode_pixels(model, b)
        times.append(time.perf_counter() - t)
        cpu += time.process_time() - c
    n = sum(len(b) for b in batches)
    return {"images": n, "skipped": skipped, "encode_s": sum(times), "images_per_s": n / sum(times),
            "cpu_s": cpu, "cpu_s_per_image": cpu / n,
            "batch_s": times, "warmup_s": warm_s, "decode_preprocess_s_serial": decode_s,
            "decode_preprocess_per_image_s": decode_s / max(1, len(samples)), "load_encoder_s": load_s}


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def pipeline(images: Path, out: Path, weights: str, policy: str, size: int, batch_size: int, workers: int,
             n: int, shard_size: int, device: str = "cpu") -> dict[str, Any]:
    from datasets_tools.encode import encode_dataset

    t, c, ch = time.perf_counter(), time.process_time(), _children_cpu()
    s = encode_dataset(images, out, weights, policy=policy, size=size, batch_size=batch_size, workers=workers,
                       limit=n, shard_size=shard_size, progress=False, log=log, device=device)
    wall = time.perf_counter() - t
    cpu, cpu_children = time.process_time() - c, _children_cpu() - ch
    return {"images": s.encoded, "skipped": s.skipped, "reasons": s.reasons, "wall_s": wall,
            "cpu_s_main": cpu, "cpu_s_workers": cpu_children,
            "cpu_s_per_image": (cpu + cpu_children) / max(1, s.encoded),
            "images_per_s": s.encoded / wall, "summary": s.line()}


# --------------------------------------------------------------------------------------------
# 2. random reads, 3. size
# --------------------------------------------------------------------------------------------
def write_random_store(out: Path, count: int, size: int, shard_size: int, seed: int) -> float:
    """A finalised store of ``count`` random float16 latents (center policy at ``size``), via the store API."""
    from datasets_tools.encode import store_identity
    from datasets_tools.sources import Sample
    from datasets_tools.store import LatentStore, bucket_name

    t = time.perf_counter()
    identity = store_identity(Path("effnet_encoder.safetensors"), "random-latents-" + "0" * 49, "center", size,
                              "float16", shard_size)
    store = LatentStore.open_for_writing(out, identity)
    samples = [Sample(id=f"rand{i:07d}", source=f"random/{i:07d}.jpg", location=f"random/{i:07d}.jpg",
                      caption=f"random caption {i}") for i in range(count)]
    units = [samples[i:i + shard_size] for i in range(0, count, shard_size)]
    store.append_units(units, 0)
    bucket = (size, size)
    store.set_capacity(len(units), [bucket])
    rng = np.random.default_rng(seed)
    lh = size // 32
    for k, unit in enumerate(units):
        rows = {bucket: {"latents": list(rng.standard_normal((len(unit), 16, lh, lh), dtype=np.float32)),
                         "id": [s.id for s in unit], "source": [s.source for s in unit],
                         "caption": [s.caption for s in unit], "orig_size": [(1024, 1024)] * len(unit),
                         "crop_box": [(0, 0, 1024, 1024)] * len(unit)}}
        store.write_unit(k, len(units), rows)
        store.commit(k, {"counts": {bucket_name(bucket): len(unit)}, "errors": [], "warnings": [], "elapsed": 0,
                         "rank": 0})
    store.finalise(len(units))
    return time.perf_counter() - t


def random_reads(store: Path, passes: int, seed: int) -> dict[str, Any]:
    from datasets_tools import LatentDataset

    ds = LatentDataset(store)
    n = len(ds)
    ds[0]  # open handles (not timed)
    rates = []
    rng = random.Random(seed)
    for _ in range(passes):
        perm = list(range(n))
        rng.shuffle(perm)
        t = time.perf_counter()
        for i in perm:
            ds[i]
        rates.append(n / (time.perf_counter() - t))
    return {"samples": n, "passes": passes, "samples_per_s_per_pass": rates, "samples_per_s": max(rates),
            "fast_reader": all(type(f).__name__ == "method" and type(f.__self__).__name__ == "ShardedReader"
                               for f in ds._arrays().values())}


def loader_reads(store: Path, batch_size: int, workers: int, seed: int) -> dict[str, Any]:
    from datasets_tools import BucketBatchSampler, LatentDataset

    t0 = time.perf_counter()
    ds = LatentDataset(store)
    sampler = BucketBatchSampler(ds, batch_size, shuffle=True, seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
    t = time.perf_counter()
    count = 0
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t
        count += batch["latent"].shape[0]
    wall = time.perf_counter() - t
    return {"workers": workers, "batch_size": batch_size, "samples": count, "wall_s": wall,
            "samples_per_s": count / wall, "first_batch_s": first, "dataset_open_s": t - t0}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def store_size(store: Path) -> dict[str, Any]:
    from datasets_tools.store import LatentStore

    attrs = LatentStore.open(store).attrs
    count = int(attrs.get("count", 0))
    latents = sum(du(store / b / "latents") for b in attrs.get("buckets", {}))
    total = du(store)
    return {"count": count, "bytes": total, "latent_bytes": latents,
            "bytes_per_sample": total / count if count else None,
            "latent_bytes_per_sample": latents / count if count else None, "dtype": attrs.get("dtype"),
            "buckets": attrs.get("buckets")}


# --------------------------------------------------------------------------------------------
# Environment, table
# --------------------------------------------------------------------------------------------
def environment(args: argparse.Namespace) -> dict[str, Any]:
    """The report's environment record, with this benchmark's threads, the load at its start and the store
    libraries' versions."""
    return environment_record(packages=("zarr", "numcodecs", "PIL"), dirty_paths=("codec", "datasets_tools"),
                              threads=args.threads, loadavg_at_start=list(os.getloadavg()), device=args.device)


def format_table(r: dict[str, Any]) -> str:
    env, o, c = r["environment"], r["options"], r["corpus"]
    lines = [f"cascade-codec dataset benchmark — torch {env['torch']}, zarr {env.get('zarr')}, "
             f"{env['cpu']['model']}, {env['threads']} threads, encoding on {env.get('device', 'cpu')}"
             + (f" ({env['cuda_device']})" if env.get("cuda_device") and env.get("device", "").startswith("cuda") else "")
             + ", load avg at start "
             f"{env['loadavg_at_start'][0]:.2f}",
             f"weights: {r['weights']['label']}",
             f"images: {c['count']} JPEGs in {c['folder']} ({c['label']}), sides {c['min_side']}–{c['max_side']} px, "
             f"{c['bytes'] / c['count'] / 1e3:.0f} kB avg",
             f"policy {o['policy']} at {o['size']}², batch {o['batch_size']}, pipeline workers {o['workers']}", ""]
    head = f"{'measurement':<58} {'value':>14}  {'goal / note'}"
    lines += [head, "-" * 100]

    def row(name: str, value: str, note: str = "") -> None:
        lines.append(f"{name:<58} {value:>14}  {note}")

    e = r.get("encode")
    if e:
        m, p = e["model_only"], e["pipeline"]
        row("model-only encode_pixels (pre-decoded, warm)", f"{m['images_per_s']:.3f} img/s",
            f"{m['images']} images, {m['encode_s']:.1f} s")
        row("pipeline encode_dataset (cold, end to end)", f"{p['images_per_s']:.3f} img/s",
            f"{p['images']} images, {p['wall_s']:.1f} s, skipped {p['skipped']}")
        ratio = e["ratio"]
        row("ratio pipeline / model-only", f"{100 * ratio:.1f} %", f"goal ≥ 90 %: {'MET' if ratio >= 0.9 else 'NOT MET'}")
        row("  decode+preprocess, serial, per image (this process)", f"{1e3 * m['decode_preprocess_per_image_s']:.0f} ms",
            "done by the pipeline's workers in parallel")
        row("  CPU s per image: model-only / pipeline (main + workers)",
            f"{m['cpu_s_per_image']:.2f} / {p['cpu_s_per_image']:.2f}",
            f"load-insensitive; pipeline workers {p['cpu_s_workers']:.0f} s of {p['cpu_s_main'] + p['cpu_s_workers']:.0f} s")
        row("  encoder load / warm-up batch (model-only run)", f"{m['load_encoder_s']:.1f} / {m['warmup_s']:.1f} s",
            "the pipeline pays both inside its wall time")
    rd = r["reads"]
    row(f"LatentDataset[i] shuffled, 1 process, {rd['random']['samples']} random latents",
        f"{rd['random']['samples_per_s']:,.0f} /s",
        f"goal ≥ 20,000/s: {'MET' if rd['random']['samples_per_s'] >= 20000 else 'NOT MET'}"
        f"; best of {rd['random']['passes']} passes"
        + ("" if rd['random']['fast_reader'] else "; zarr fallback (no ShardedReader)"))
    if rd.get("encoded"):
        row(f"LatentDataset[i] shuffled, 1 process, step-1 store ({rd['encoded']['samples']})",
            f"{rd['encoded']['samples_per_s']:,.0f} /s", "real latents, small store")
    for lr in rd["loader"]:
        row(f"DataLoader(BucketBatchSampler bs={lr['batch_size']}), workers={lr['workers']}",
            f"{lr['samples_per_s']:,.0f} /s", f"one epoch incl. start-up; first batch {lr['first_batch_s']:.2f} s")
    for key, label in (("encoded", "step-1 store (real latents)"), ("random", "random-latent store")):
        s = r["size"].get(key)
        if s:
            row(f"store bytes/sample, {label}, {s['dtype']}", f"{s['bytes_per_sample']:,.0f} B",
                f"latents only {s['latent_bytes_per_sample']:,.0f} B; {s['count']} samples, {s['bytes'] / 1e6:.1f} MB")
    notes = ["", "notes:"]
    if r["weights"]["tiny"]:
        notes.append("* tiny random weights: full-size EfficientNetV2-S architecture, so encoder speed is "
                     "representative; latent values are meaningless.")
    if c.get("upscaled"):
        notes.append("* NO LARGE PHOTOS FOUND: the corpus is UPSCALED small sample photos (labelled above).")
    if e and max(e["model_only"]["loadavg_1min_before_after"] + e["pipeline"]["loadavg_1min_before_after"]) \
            > env["threads"] + 0.5:
        notes.append("* 1-min load average before/after model-only {:.1f}/{:.1f}, pipeline {:.1f}/{:.1f} on {} CPUs: "
                     "other processes competed for the CPU during step 1, so the ratio carries that noise."
                     .format(*e["model_only"]["loadavg_1min_before_after"], *e["pipeline"]["loadavg_1min_before_after"],
                             env["cpu"]["logical_cpus"]))
    if env["loadavg_at_start"][0] > env["threads"] + 0.5:
        notes.append(f"* load average {env['loadavg_at_start'][0]:.2f} at start on {env['cpu']['logical_cpus']} "
                     "CPUs: other processes competed for the CPU; absolute rates are pessimistic.")
    notes.append("* model-only times only encode_pixels calls after a warm-up batch; the pipeline is timed cold "
                 "(listing, encoder load, worker start-up, decode/resize, encode, store writes, finalise).")
    return "\n".join(lines + notes)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
HELP_EPILOG = """\
expected runtime (2 CPU cores, no GPU, full-size EfficientNet ≈ 1 s per 768² image): the default
run (200 images) takes about 8–10 minutes: corpus build on first use ~1 min, model-only pass
~3–4 min, pipeline pass ~3–4 min, reads and store size < 30 s.

quick run (~1 min):
  python -m benchmarks.dataset --n 8 --size 128 --read-samples 2000
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.dataset",
        description="Measure the latent-dataset tools: encode_dataset images/s against model-only encoder "
                    "throughput on the same images (goal ≥ 90 %), LatentDataset shuffled random reads/s "
                    "(goal ≥ 20,000/s in one process) and DataLoader reads/s, and store bytes per sample.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=None,
                   help="folder of JPEG photos to encode (the first --n in the job's listing order are used); "
                        "default: build/reuse the crop corpus in --corpus-dir")
    p.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS,
                   help=f"where the crop corpus is cached when --images is not given (default: {DEFAULT_CORPUS})")
    p.add_argument("--photos", action="append", default=None, metavar="GLOB",
                   help="glob of source photos for the corpus; repeatable (default: "
                        + ", ".join(DEFAULT_PHOTOS) + "); only photos with short side ≥ 1024 px are cut, unless "
                        "none is that large (then small ones are upscaled and labelled so)")
    p.add_argument("--n", type=int, default=200, help="number of images to encode (default: 200)")
    p.add_argument("--size", type=int, default=768,
                   help="encoder input side in px, multiple of 32 (default: 768 → 16×24×24 latents)")
    p.add_argument("--policy", default="center", choices=("center", "buckets", "keep-aspect"),
                   help="preprocessing policy for both runs (default: center)")
    p.add_argument("--batch-size", type=int, default=8, help="encoder batch size of both runs (default: 8)")
    p.add_argument("--workers", type=int, default=2,
                   help="decode/resize DataLoader workers of the pipeline (default: 2, encode_dataset's default)")
    p.add_argument("--shard-size", type=int, default=256,
                   help="samples per unit/shard of the stores written (default: 256, encode_dataset's default)")
    p.add_argument("--weights", default=None,
                   help="weights folder or Hugging Face repo id holding effnet_encoder.safetensors (default: tiny "
                        "random weights written to a temporary folder)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the encoder (default: 2)")
    p.add_argument("--device", default="auto",
                   help="where both encoding runs compute: auto (a GPU when there is one), cpu, cuda, cuda:N "
                        "(default: auto). On a GPU give the workers and batch size that feed it, e.g. "
                        "--workers 14 --batch-size 64")
    p.add_argument("--read-samples", type=int, default=5000,
                   help="random latents written to the read-benchmark store (default: 5000)")
    p.add_argument("--read-passes", type=int, default=3,
                   help="shuffled passes over the read store; the best is reported (default: 3)")
    p.add_argument("--read-batch-size", type=int, default=64, help="DataLoader batch size (default: 64)")
    p.add_argument("--skip-encode", action="store_true",
                   help="skip step 1 (pipeline vs model-only); only reads and store size")
    p.add_argument("--seed", type=int, default=0, help="seed of corpus crops, random latents and shuffles (default: 0)")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the stores written here (default: a temporary folder, deleted at the end)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                   help="JSON file for environment, options and all numbers (default: benchmarks/results/"
                        "dataset.json next to this script)")
    args = p.parse_args(argv)
    args.device = device_arg(p, args.device)
    if args.size < 32 or args.size % 32:
        p.error("--size must be a positive multiple of 32")
    for name in ("n", "batch_size", "shard_size", "threads", "read_samples", "read_passes", "read_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.workers < 0:
        p.error("--workers must be ≥ 0")
    if args.images is not None and not args.images.is_dir():
        p.error(f"--images {args.images}: not a folder")
    args.photos = args.photos or list(DEFAULT_PHOTOS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"environment": env,
                              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="cascade_dsbench_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in ("encoded.zarr", "random.zarr"):
            shutil.rmtree(work / name, ignore_errors=True)
        if args.weights is None:
            from codec.tiny import write_tiny_weights

            weights = str(write_tiny_weights(Path(tmp) / "tiny_weights"))
            report["weights"] = {"tiny": True, "path": weights,
                                 "label": "TINY RANDOM (codec.tiny.write_tiny_weights; real EfficientNetV2-S "
                                          "architecture)"}
        else:
            weights = args.weights
            report["weights"] = {"tiny": False, "path": weights, "label": weights}

        # ---- corpus
        if args.images is None:
            manifest = build_corpus(args.corpus_dir, args.n, args.photos, args.seed)
            folder = args.corpus_dir
            used = sorted({f["source"] for f in manifest["files"][:args.n]})
            label = ("UPSCALED small sample photos" if manifest["upscaled"]
                     else f"seeded crops of {len(used)} large real photos")
            corpus = {"folder": str(folder), "label": label, "upscaled": manifest["upscaled"], "sources": used}
        else:
            folder = args.images
            corpus = {"folder": str(folder), "label": "user folder", "upscaled": False}
        d = describe_folder(folder, args.n)
        samples = d.pop("samples")
        corpus.update(d)
        report["corpus"] = corpus
        if d["count"] < args.n:
            log(f"warning: only {d['count']} images in {folder} (asked for {args.n})")

        # ---- 1. pipeline vs model-only
        if not args.skip_encode:
            log(f"model-only: decoding {len(samples)} images, then encode_pixels in batches of {args.batch_size}")
            la0 = os.getloadavg()[0]
            m = model_only(weights, samples, args.policy, args.size, args.batch_size, args.device)
            m["loadavg_1min_before_after"] = [la0, os.getloadavg()[0]]
            log(f"model-only: {m['images_per_s']:.3f} img/s")
            log(f"pipeline: encode_dataset with {args.workers} workers")
            p = pipeline(folder, work / "encoded.zarr", weights, args.policy, args.size, args.batch_size,
                         args.workers, args.n, args.shard_size, args.device)
            p["loadavg_1min_before_after"] = [m["loadavg_1min_before_after"][1], os.getloadavg()[0]]
            log(f"pipeline: {p['summary']}")
            report["encode"] = {"model_only": m, "pipeline": p, "ratio": p["images_per_s"] / m["images_per_s"]}

        # ---- 2. reads
        log(f"reads: writing {args.read_samples} random latents")
        write_s = write_random_store(work / "random.zarr", args.read_samples, args.size, args.shard_size, args.seed)
        reads: dict[str, Any] = {"random_store_write_s": write_s}
        reads["random"] = random_reads(work / "random.zarr", args.read_passes, args.seed)
        log(f"reads: {reads['random']['samples_per_s']:,.0f} samples/s")
        if not args.skip_encode:
            reads["encoded"] = random_reads(work / "encoded.zarr", args.read_passes, args.seed)
        reads["loader"] = [loader_reads(work / "random.zarr", args.read_batch_size, w, args.seed) for w in (0, 2)]
        report["reads"] = reads

        # ---- 3. size
        report["size"] = {"random": store_size(work / "random.zarr")}
        if not args.skip_encode:
            report["size"]["encoded"] = store_size(work / "encoded.zarr")
    report["total_runtime_s"] = time.perf_counter() - t_start
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print(format_table(report))
    print(f"\ntotal runtime {report['total_runtime_s']:.0f}s; JSON written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
