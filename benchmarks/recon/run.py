"""The benchmark run: for every image, every codec → reconstruction → metrics → one CSV row; then the reports.

Resuming: ``state.json`` (+ ``fid_state.pt`` when rFID is computed) records how many
images are complete. It is written after every image, or — when the rFID statistics are
large (above :data:`BIG_STATE` bytes) — at most every ``checkpoint_seconds``. Running the
same command again drops the CSV rows of images after that point and continues from
there; every quality number is a deterministic function of (image, codec settings, seed),
so the result is the same as an uninterrupted run. A report folder made with other
settings is refused (``--overwrite`` starts it afresh).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from benchmarks.environment import environment_record
from codec.devices import resolve_device
from codec.errors import UsageError
from codec.files import atomic_write
from codec.images import pil_to_uint8, uint8_to_pil
from codec.progress import progress_bar

from . import metrics as M
from .codecs import BUDGET_SUFFIX, Context, build, parse_specs
from .data import open_dataset
from .grid import GridRow, make_grid
from .html_report import RunView, write_html_report
from .measure import PeakMemory
from .plot import has_sweep, rate_quality_plot
from .report import (
    CSV_NAME,
    GRID_DIR,
    HTML_NAME,
    PLOT_FILE,
    SCHEMA,
    SCHEMA_VERSION,
    SUMMARY_NAME,
    TABLE_NAME,
    CsvWriter,
    aggregate,
    grid_image_name,
    header_lines,
    markdown_table,
    read_rows,
    truncate_rows,
    validate_summary,
)

DEFAULT_CODECS = ("sc", "jpeg-budget", "bicubic")
RUN_FILE, STATE_FILE, FID_STATE_FILE = "run.json", "state.json", "fid_state.pt"
GRID_FILE = "grid.png"
BIG_STATE = 64 * 2**20
# Options that do not change any number (a run may be resumed with other values).
NOT_IDENTITY = ("output", "limit", "overwrite", "progress", "checkpoint_seconds", "grid_images", "threads")


@dataclass
class ReconConfig:
    """Everything ``cascade bench recon`` takes (see its ``--help``)."""

    dataset: str
    output: str
    codecs: list[str] = field(default_factory=lambda: list(DEFAULT_CODECS))
    size: int | None = None
    limit: int | None = None
    seed: int = 0
    weights: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    lpips_net: str = "alex"
    lpips_weights: str | None = None
    fid_weights: str | None = None
    lpips: bool = True
    fid: bool = True
    grid_images: int = 3
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    checkpoint_seconds: float = 60.0


PROTOCOL = {
    "quantisation": "reconstructions rounded to uint8 before every metric",
    "psnr": f"per image over RGB, data range 255 (torchmetrics), then the mean over images; capped at "
            f"{M.PSNR_CAP:g} dB",
    "ssim": "torchmetrics, Gaussian window 11 px, sigma 1.5, RGB (mean over channels), data range 255, "
            "K1 0.01, K2 0.03",
    "ms_ssim": "torchmetrics, same window, 5 scales, standard weights (needs sides >= 161 px)",
    "lpips": "lpips package, v0.1 linear heads, inputs mapped to [-1, 1]",
    "rfid": "Inception-v3 pool3 2048-d of the reconstructions against the originals of the same set (resized to "
            "299 with antialiased bilinear); Frechet distance by torchmetrics",
    "rate": "bytes of what a codec stores: float16 latents (Stable Cascade, VAEs), the JPEG file, uint8 values "
            "(bicubic); bpp = 8 bytes / (H W); compression ratio = 3 H W (uint8 RGB) / bytes",
    "timing": "wall seconds per image at batch size 1, encode and decode measured separately; mean over images "
              "without the first one each process measured (warm-up), unless there is no other",
    "memory": "peak resident memory of the process while the codec ran (CPU, sampled every 5 ms) or the CUDA "
              "allocator's peak",
    "seed": "Stage B noise is seeded per image from --seed and the image id",
}


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def environment(device: str) -> dict[str, Any]:
    """The summary's environment record: versions of the metric and codec libraries, threads, device."""
    return environment_record(packages=("torchvision", "torchmetrics", "lpips", "PIL", "numpy", "diffusers",
                                        "torch_fidelity", "imagecodecs"), torch_threads=torch.get_num_threads(), device=device)


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"cascade-codec {version('cascade-codec')}"
    except PackageNotFoundError:
        return "cascade-codec unknown"


class _Folder:
    """The report folder: identity check, state save/load."""

    def __init__(self, cfg: ReconConfig, identity: dict[str, Any]):
        self.path = Path(cfg.output).expanduser()
        run = self.path / RUN_FILE
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{self.path} is a file; -o needs a folder for the report")
        if cfg.overwrite and run.exists():
            for name in (RUN_FILE, STATE_FILE, FID_STATE_FILE, CSV_NAME, SUMMARY_NAME, TABLE_NAME, GRID_FILE,
                         PLOT_FILE, HTML_NAME):
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / GRID_DIR, ignore_errors=True)
        if run.exists():
            old = json.loads(run.read_text(encoding="utf-8")).get("identity", {})
            diffs = [f"{k}: report has {old.get(k)!r}, this run {identity.get(k)!r}"
                     for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
            if diffs:
                raise UsageError(f"{self.path} holds a run made with other settings ({'; '.join(diffs)}); use the "
                                 "same settings to resume it, --overwrite to start it afresh, or another -o")
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise UsageError(f"{self.path} is not empty and holds no benchmark run; choose a new or empty -o folder")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / GRID_DIR).mkdir(exist_ok=True)
        if not run.exists():
            _write_json(run, {"identity": identity, "started": _now()})

    def load_state(self) -> dict[str, Any]:
        p = self.path / STATE_FILE
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {"images_done": 0, "skipped": []}

    def save_state(self, images_done: int, skipped: list[dict[str, str]], fid: M.FIDAccumulator | None) -> None:
        if fid is not None:  # written first; it records the image count it belongs to
            with atomic_write(self.path / FID_STATE_FILE) as tmp:
                torch.save({"images_done": images_done, "fid": fid.state_dict()}, tmp)
        _write_json(self.path / STATE_FILE, {"images_done": images_done, "skipped": skipped, "saved": _now()})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_recon(cfg: ReconConfig, log: Callable[[str], None] = print, fid_extractor: torch.nn.Module | None = None,
              lpips_random_trunk: bool = False) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; write the reports into ``cfg.output``; return the summary.

    ``fid_extractor`` replaces the Inception file and ``lpips_random_trunk`` uses a random
    LPIPS trunk — both for tests of the metric code only (their numbers are meaningless).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ds = open_dataset(cfg.dataset, cfg.size, cfg.limit)
    configs = parse_specs(list(cfg.codecs))
    if not configs:
        raise UsageError("no codec given; use --codec (e.g. --codec sc --codec jpeg-budget)")
    if cfg.grid_images < 0:
        raise UsageError(f"--grid-images must be ≥ 0, got {cfg.grid_images}")
    identity = {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}
    identity["codecs"] = [c.label for c in configs]
    identity["dataset"] = str(Path(cfg.dataset).expanduser().absolute()) if "://" not in cfg.dataset else cfg.dataset
    folder = _Folder(cfg, identity)
    ctx = Context(cfg.weights, cfg.device, cfg.dtype, cfg.seed, ds.kind == "store", ds.latent_itemsize)
    codecs = [build(c) for c in configs]
    for c in codecs:
        c.prepare(ctx)
    device = str(resolve_device(cfg.device))
    if lpips_random_trunk:
        lp = M.LPIPSMetric(cfg.lpips_net, None, device, random_trunk=True)
        lp_status = M.MetricStatus("lpips", True, detail=f"lpips 0.1, {cfg.lpips_net} trunk: {lp.source}")
    else:
        lp, lp_status = M.lpips_metric(cfg.lpips_net, cfg.lpips_weights, cfg.lpips, device)
    fid, fid_status = M.fid_metric(cfg.fid_weights, [c.label for c in codecs], cfg.fid, device, fid_extractor)
    for status in (lp_status, fid_status):
        log(f"{'metric' if status.available else 'note'}: {status.detail or status.message}")

    state = folder.load_state()
    done, skipped = int(state["images_done"]), list(state["skipped"])
    if fid is not None and done:
        saved = torch.load(folder.path / FID_STATE_FILE, map_location="cpu", weights_only=True)
        if saved["images_done"] == done:
            fid.load_state_dict(saved["fid"])
        else:  # interrupted between the two files: the rFID statistics are of another point; start over
            log(f"note: {folder.path / FID_STATE_FILE} does not match {STATE_FILE}; starting from the first image")
            done, skipped = 0, []
    csv_path = folder.path / CSV_NAME
    truncate_rows(csv_path, done)
    if done:
        log(f"resuming {folder.path}: {done} of {len(ds)} images done")
    big = fid is not None and sum(t.numel() * t.element_size() for s in fid.state_dict().values()
                                  for t in s.values()) > BIG_STATE
    writer = CsvWriter(csv_path)
    bar = progress_bar(len(ds), "bench recon", "img", enabled=None if cfg.progress else False, initial=done)
    last_save, warmup = time.monotonic(), True
    try:
        for item in ds.items(done):
            if item.error is not None:
                skipped.append({"id": item.id, "source": item.source, "reason": item.error})
            else:
                _measure_image(item, codecs, writer, lp, fid, folder.path / GRID_DIR,
                               grid_indices(len(ds), cfg.grid_images), device, bar, warmup)
                warmup = False
            done = item.index + 1
            bar.update(1)
            if not big or time.monotonic() - last_save >= cfg.checkpoint_seconds or done == len(ds):
                folder.save_state(done, skipped, fid)
                last_save = time.monotonic()
    finally:
        bar.close()
        writer.close()
    folder.save_state(done, skipped, fid)
    return _finish(cfg, ds, codecs, lp_status, fid_status, fid, skipped, folder.path, device)


def grid_indices(total: int, n: int) -> set[int]:
    """The images shown in the grid: ``n`` spread evenly over the ``total`` of the set (first, …, near the last),
    so that a folder listed photo by photo shows several photos."""
    n = min(n, total)
    return {i * total // n for i in range(n)} if n else set()


def _measure_image(item, codecs, writer: CsvWriter, lp, fid, grid_dir: Path, grid: set[int], device: str,
                   bar, warmup: bool) -> None:
    ref = item.image
    height, width = ref.shape[-2:]
    keep = item.index in grid
    if keep:
        uint8_to_pil(ref).save(grid_dir / grid_image_name(item.index))
    if fid is not None:
        fid.add_original(ref)
    for codec in codecs:
        bar.set_postfix_str(codec.label, refresh=False)
        with PeakMemory(device) as mem:
            out = codec.run(item)
        if tuple(out.image.shape) != tuple(ref.shape) or out.image.dtype != torch.uint8:
            raise RuntimeError(f"codec {codec.label} returned {out.image.dtype} {list(out.image.shape)} for a "
                               f"{list(ref.shape)} image")
        writer.write({
            "image_index": item.index, "image_id": item.id, "codec": codec.label, "codec_title": codec.title,
            "height": height, "width": width, "bytes": out.nbytes, "bpp": 8.0 * out.nbytes / (height * width),
            "compression_ratio": 3.0 * height * width / out.nbytes,
            "psnr": M.psnr(out.image, ref), "ssim": M.ssim(out.image, ref), "ms_ssim": M.ms_ssim(out.image, ref),
            "lpips": lp(out.image, ref) if lp is not None else None,
            "encode_s": out.encode_s, "decode_s": out.decode_s, "peak_memory_bytes": mem.peak,
            "orig_height": item.orig_size[0], "orig_width": item.orig_size[1], "crop_box": list(item.crop_box),
            "warmup": int(warmup), "extra": out.extra or None})
        if fid is not None:
            fid.add_reconstruction(codec.label, out.image)
        if keep:
            uint8_to_pil(out.image).save(grid_dir / grid_image_name(item.index, codec.label))


def _finish(cfg: ReconConfig, ds, codecs, lp_status, fid_status, fid, skipped, out: Path,
            device: str) -> dict[str, Any]:
    labels = [c.label for c in codecs]
    stats, images = aggregate(out / CSV_NAME, labels)
    ms_values = any(stats[c]["ms_ssim"] for c in labels)
    metrics = {
        "psnr": {"available": True, "detail": PROTOCOL["psnr"], "message": ""},
        "ssim": {"available": True, "detail": PROTOCOL["ssim"], "message": ""},
        "ms_ssim": {"available": ms_values or not images["n"], "detail": PROTOCOL["ms_ssim"],
                    "message": "" if ms_values or not images["n"] else
                    f"MS-SSIM not computed: images smaller than {M.MS_SSIM_MIN_SIDE} px"},
        "lpips": {**lp_status.to_json(), "net": cfg.lpips_net},
        "rfid": fid_status.to_json(),
    }
    results = []
    for c in codecs:
        s = stats[c.label]
        rfid, why = (fid.compute(c.label) if fid is not None else (None, fid_status.message))
        notes = []
        if c.config.family.endswith(BUDGET_SUFFIX) and s["extra"].get("over_budget"):
            notes.append(f"{s['extra']['over_budget']} image(s) did not fit the budget even at the smallest setting "
                         "(their true, larger size is counted)")
        if c.config.family == "sc" and ds.kind == "store":
            notes.append("decode-only: the stored latents were decoded (no encode time)")
        if why and fid is not None:
            notes.append(f"rFID {why}")
        results.append({"label": c.label, "title": c.title, "family": c.config.family, "spec": c.config.spec,
                        "params": c.config.params,
                        "weights": c.weights_info, "encoder": c.encoder_info, "rfid": rfid, "notes": notes,
                        **{k: v for k, v in s.items()}})
    summary = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": _now(), "tool": _tool_version(),
        "config": {**asdict(cfg), "codecs_expanded": labels},
        "dataset": {**ds.describe(), "n": images["n"], "n_resized": images["resized"],
                    "n_upscaled": images["upscaled"], "sizes": images["sizes"]},
        "protocol": PROTOCOL, "metrics": metrics, "codecs": results, "skipped": skipped,
        "environment": environment(device),
        "files": {"csv": CSV_NAME, "summary": SUMMARY_NAME, "table": TABLE_NAME, "grid": None, "plot": None},
    }
    if cfg.grid_images and images["n"]:
        grid = _grid(out, codecs, summary, grid_indices(len(ds), cfg.grid_images))
        if grid is not None:
            summary["files"]["grid"] = GRID_FILE
    if has_sweep(summary) and rate_quality_plot(summary, out / PLOT_FILE) is not None:
        summary["files"]["plot"] = PLOT_FILE
    summary["files"]["html"] = HTML_NAME
    validate_summary(summary)
    _write_json(out / SUMMARY_NAME, summary)
    (out / TABLE_NAME).write_text(markdown_table(summary), encoding="utf-8")
    write_html_report(out / HTML_NAME, [RunView("", summary, out)])
    return summary


def _grid(out: Path, codecs, summary: dict[str, Any], shown: set[int]) -> Path | None:
    grid_dir = out / GRID_DIR
    captions: dict[tuple[int, str], str] = {}
    ids: dict[int, str] = {}
    for row in read_rows(out / CSV_NAME):
        if row["image_index"] not in shown:
            continue
        ids[row["image_index"]] = row["image_id"]
        captions[(row["image_index"], row["codec"])] = f"PSNR {row['psnr']:.2f} dB, {row['bpp']:.3f} bpp"
    rows = []
    for index in sorted(ids):
        original = grid_dir / grid_image_name(index)
        if not original.exists():
            continue
        recons = []
        for c in codecs:
            p = grid_dir / grid_image_name(index, c.label)
            recons.append((_load_png(p) if p.exists() else None, captions.get((index, c.label), "")))
        rows.append(GridRow(ids[index], _load_png(original), recons))
    if not rows:
        return None
    image = make_grid(rows, ["original"] + [c.title for c in codecs], header_lines(summary))
    image.save(out / GRID_FILE)
    return out / GRID_FILE


def _load_png(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return pil_to_uint8(im)
