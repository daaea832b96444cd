"""The dataset encoding job: source → plan → (decode, preprocess, encode, write, commit) per unit → finalise.

Work is split into units of ``shard_size`` consecutive samples. Rank 0 plans (lists the
source, appends units for samples not yet planned, sizes the arrays); every rank then
processes its units (unit k → rank k mod WORLD_SIZE) that have no commit record; rank 0
finalises (index, error tables, attributes). Killing the job at any moment and running
it again continues where it stopped: uncommitted units are recomputed from scratch and,
because encoding is deterministic (fixed batches per unit), give identical latents.

Decoding and resizing run in a torch ``DataLoader`` with ``workers`` processes so they
overlap the encoder. Bad inputs never raise: each becomes an error record
``(id, source, "reason: detail")``.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from codec.codec import encode_pixels, load_encoder

from .preprocess import POLICIES, RESIZE, known_buckets, preprocess
from .sources import Sample, list_source
from .store import FORMAT, FORMAT_VERSION, LATENT_CHANNELS, LatentStore, StoreError, bucket_name

DTYPES = ("float16", "float32")


class SampleError(Exception):
    """One input cannot be used; ``str(e)`` is ``"reason: detail"``."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encoder_file(weights: str | os.PathLike) -> Path:
    """Local path of ``effnet_encoder.safetensors`` in a weights folder or Hugging Face repo id."""
    from codec import interop
    from codec import weights as W

    src = W.WeightSource(weights)
    interop.require_encoder(src)
    return src.path(W.EFFNET_FILE)


def decode_image(data: bytes) -> torch.Tensor:
    """Image file bytes → upright RGB ``(3,h,w)`` float in [0,1]; :class:`SampleError` with a reason otherwise."""
    from codec.images import ImageReadError, load_image, pil_to_tensor

    try:
        return pil_to_tensor(load_image(data))
    except ImageReadError as e:
        raise SampleError(e.reason) from None


class _UnitItems(torch.utils.data.Dataset):
    """Decode + preprocess one planned sample per item (runs in DataLoader workers); never raises for bad input."""

    def __init__(self, items: list[tuple[int, Sample]], policy: str, size: int):
        self.items, self.policy, self.size = items, policy, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        unit, sample = self.items[i]
        caption, warning = sample.read_caption()
        out: dict[str, Any] = {"unit": unit, "id": sample.id, "source": sample.source, "caption": caption,
                               "warning": warning, "error": None}
        try:
            try:
                data = sample.read_bytes()
            except FileNotFoundError:
                raise SampleError(f"missing file: {sample.location}") from None
            except OSError as e:
                raise SampleError(f"unreadable file: {e}") from None
            p = preprocess(decode_image(data), self.policy, self.size)
            out.update(pixels=p.pixels, orig_size=p.orig_size, crop_box=p.crop_box, bucket=p.bucket)
        except SampleError as e:
            out["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - a bad file must never stop the job; the reason is recorded
            out["error"] = f"unexpected error: {type(e).__name__}: {e}"
        return out


def _identity_collate(x):
    return x


@dataclass
class Summary:
    """What a run did."""

    encoded: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    warnings: int = 0
    units_done: int = 0
    units_pending: int = 0
    new_samples: int = 0
    listed: int = 0
    seconds: float = 0.0
    store: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False

    def line(self) -> str:
        """One-line human summary."""
        if self.dry_run:
            return (f"dry run: {self.listed} samples listed, {self.new_samples} new; "
                    f"{self.units_pending} unit(s) would be encoded; nothing was written")
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        rate = self.encoded / self.seconds if self.seconds > 0 else 0.0
        s = (f"encoded {self.encoded}, skipped {self.skipped}" + (f" ({why})" if why else "")
             + f" in {self.seconds:.1f} s ({rate:.1f} img/s)")
        if self.store:
            s += (f"; store: {self.store.get('count', 0)} samples in {len(self.store.get('buckets', {}))} bucket(s), "
                  f"{self.store.get('errors', 0)} errors, complete={self.store.get('complete')}")
        return s


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _broadcast_error(msg: str | None, world: int) -> str | None:
    if world <= 1:
        return msg
    box = [msg]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return f"cascade-codec {version('cascade-codec')}"
    except Exception:  # noqa: BLE001
        return "cascade-codec (unknown version)"


def store_identity(encoder_path: Path, sha256: str, policy: str, size: int, dtype: str,
                   shard_size: int) -> dict[str, Any]:
    """The root attributes that must match for a run to resume or extend a store."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "encoder": {"file": encoder_path.name, "sha256": sha256},
            "preprocess": {"policy": policy, "size": size, "resize": RESIZE, "factor": 32},
            "dtype": dtype, "latent_channels": LATENT_CHANNELS, "shard_size": shard_size, "tool": _tool_version()}


def encode_dataset(source: str | os.PathLike, out: str | os.PathLike, weights: str | os.PathLike,
                   policy: str = "center", size: int = 768, batch_size: int = 8, workers: int = 2,
                   dtype: str = "float16", limit: int | None = None, dry_run: bool = False, shard_size: int = 256,
                   progress: bool = True, storage_options: dict[str, Any] | None = None, device: str = "cpu",
                   log: Callable[[str], None] = print) -> Summary:
    """Encode every readable image of ``source`` into the latent store ``out`` (resumable; see module doc).

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) units are split across ranks and
    synchronised with gloo barriers. Returns a :class:`Summary` (this rank's counts,
    plus the store's totals on rank 0).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if shard_size < 1 or batch_size < 1 or workers < 0:
        raise ValueError("shard_size and batch_size must be ≥ 1 and workers ≥ 0")
    if size < 32 or size % 32:
        raise ValueError(f"size must be a positive multiple of 32, got {size}")
    t0 = time.perf_counter()
    rank, world = _dist_info()
    own_group = world > 1 and not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        return _run(source, out, weights, policy, size, batch_size, workers, dtype, limit, dry_run, shard_size,
                    progress, storage_options, device, log, rank, world, t0)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _run(source, out, weights, policy, size, batch_size, workers, dtype, limit, dry_run, shard_size, progress,
         storage_options, device, log, rank, world, t0) -> Summary:
    summary = Summary(dry_run=dry_run)

    # ---- plan (rank 0); everybody learns of a refusal before any work
    error = None
    if rank == 0:
        try:
            path = encoder_file(weights)
            identity = store_identity(path, file_sha256(path), policy, size, dtype, shard_size)
            samples = list_source(source, limit)
            if not samples:
                raise StoreError(f"{source}: no images found (extensions: jpg jpeg png webp bmp tif tiff)")
            store = LatentStore.open_for_writing(out, identity, storage_options, create=not dry_run)
            plan = store.read_plan() if store is not None else []
            planned = {s.id for unit in plan for s in unit}
            new = [s for s in samples if s.id not in planned]
            new_units = [new[i:i + shard_size] for i in range(0, len(new), shard_size)]
            committed = store.committed_units() if store is not None else set()
            summary.listed, summary.new_samples = len(samples), len(new)
            summary.units_pending = len(plan) + len(new_units) - len(committed)
            if dry_run:
                state = ("absent (would be created)" if store is None
                         else f"{len(plan)} unit(s) planned, {len(committed)} committed")
                log(f"source: {source}: {len(samples)} samples; store {out}: {state}")
                log(f"would plan {len(new)} new sample(s) in {len(new_units)} new unit(s) of {shard_size}; "
                    f"would encode {summary.units_pending} unit(s) with policy={policy} size={size} dtype={dtype}")
            else:
                store.append_units(new_units, len(plan))
                store.set_capacity(len(plan) + len(new_units), known_buckets(policy, size))
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, then re-raised
            error = e
    msg = _broadcast_error(None if error is None else f"{type(error).__name__}: {error}", world)
    if error is not None:
        raise error
    if msg is not None:
        raise StoreError(f"rank 0 refused: {msg}")
    if dry_run:
        summary.seconds = time.perf_counter() - t0
        return summary

    # ---- process this rank's uncommitted units
    store = LatentStore.open(out, storage_options, mode="r+")
    plan = store.read_plan()
    n_units = len(plan)
    committed = store.committed_units()
    mine = [k for k in range(n_units) if k % world == rank and k not in committed]
    summary.units_pending = len(mine)
    items = [(k, s) for k in mine for s in plan[k]]
    if items:
        model = load_encoder(weights, device)
        _process(store, model, items, plan, n_units, policy, size, batch_size, workers, progress, device, summary)
    _barrier(world)

    # ---- finalise (rank 0); a finished store with nothing new is left untouched
    if rank == 0:
        if len(committed) < n_units or not store.attrs.get("complete"):
            summary.store = store.finalise(n_units)
        else:
            summary.store = store.attrs
    _barrier(world)
    summary.seconds = time.perf_counter() - t0
    return summary


def _process(store: LatentStore, model: torch.nn.Module, items: list[tuple[int, Sample]],
             plan: list[list[Sample]], n_units: int, policy: str, size: int, batch_size: int, workers: int,
             progress: bool, device: str, summary: Summary) -> None:
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        _UnitItems(items, policy, size), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_identity_collate, prefetch_factor=max(2, batch_size) if workers else None,
        persistent_workers=False)
    bar = tqdm(total=len(items), unit="img", desc="encode-dataset", disable=not progress, dynamic_ncols=True,
               smoothing=0.05)
    remaining = {k: len(plan[k]) for k in {k for k, _ in items}}
    unit_state: dict[int, dict[str, Any]] = {}

    def state(k: int) -> dict[str, Any]:
        return unit_state.setdefault(k, {"pending": {}, "rows": {}, "errors": [], "warnings": [],
                                         "t0": time.perf_counter()})

    def encode_batch(st: dict[str, Any], bucket: tuple[int, int]) -> None:
        batch = st["pending"].pop(bucket, [])
        if not batch:
            return
        z = encode_pixels(model, torch.stack([b["pixels"] for b in batch]))
        rows = st["rows"].setdefault(bucket, {"latents": [], "id": [], "source": [], "caption": [],
                                              "orig_size": [], "crop_box": []})
        for b, zi in zip(batch, z):
            if not torch.isfinite(zi).all():
                st["errors"].append([b["id"], b["source"], "encoder produced NaN/inf"])
                summary.reasons["encoder produced NaN/inf"] = summary.reasons.get("encoder produced NaN/inf", 0) + 1
                summary.skipped += 1
                continue
            rows["latents"].append(zi.numpy())
            for key in ("id", "source", "caption", "orig_size", "crop_box"):
                rows[key].append(b[key])

    for item in loader:
        k = item["unit"]
        st = state(k)
        if item["warning"]:
            st["warnings"].append([item["id"], item["source"], item["warning"]])
        if item["error"]:
            st["errors"].append([item["id"], item["source"], item["error"]])
            reason = item["error"].split(":", 1)[0]
            summary.reasons[reason] = summary.reasons.get(reason, 0) + 1
            summary.skipped += 1
        else:
            pend = st["pending"].setdefault(item["bucket"], [])
            pend.append(item)
            if len(pend) >= batch_size:
                encode_batch(st, item["bucket"])
        remaining[k] -= 1
        bar.update(1)
        if remaining[k] == 0:
            for bucket in sorted(st["pending"]):
                encode_batch(st, bucket)
            rows = {b: r for b, r in st["rows"].items() if r["id"]}
            store.write_unit(k, n_units, rows)
            counts = {bucket_name(b): len(r["id"]) for b, r in rows.items()}
            store.commit(k, {"counts": counts, "errors": st["errors"], "warnings": st["warnings"],
                             "elapsed": round(time.perf_counter() - st["t0"], 3), "rank": _dist_info()[0]})
            summary.encoded += sum(counts.values())
            summary.warnings += len(st["warnings"])
            summary.units_done += 1
            del unit_state[k]
            bar.set_postfix(units=summary.units_done, skipped=summary.skipped)
    bar.close()
