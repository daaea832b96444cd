"""The dataset encoding job: source → plan → (decode, preprocess, encode, write, commit) per unit → finalise.

Work is split into units of ``shard_size`` consecutive samples. Rank 0 plans (lists the
source, appends units for samples not yet planned, sizes the arrays); every rank then
processes its units (unit k → rank k mod WORLD_SIZE) that have no commit record; rank 0
finalises (index, error tables, attributes). Killing the job at any moment and running
it again continues where it stopped: uncommitted units are recomputed from scratch and,
because encoding is deterministic (fixed batches per unit), give identical latents.

Decoding runs in a torch ``DataLoader`` with ``workers`` processes so it overlaps the
encoder. Where the resize runs depends on the device (:func:`_resize_on_device`): on the CPU
the workers also resize and crop (:func:`~datasets_tools.preprocess.preprocess`) and send
float pixels at the encoder's size; on a CUDA device they send the decoded image as uint8
``(3,h,w)`` (a quarter of the bytes of float32, in pinned memory) with its
:class:`~datasets_tools.preprocess.Geometry`, and the main process moves it to the device,
converts it to float (:func:`codec.images.from_uint8`) and resizes and crops it there with the
same antialiased bilinear resize (:func:`~datasets_tools.preprocess.apply_geometry`). Bad inputs
never raise: each becomes an error record ``(id, source, "reason: detail")``.

Optional extras, computed in the same batches as the latents (so resumed units are
bitwise identical too): CLIP text embeddings of the captions (``text_encoder``; a
sample without a caption gets the embedding of ``""``) and Stage A latents of the same
preprocessed image (``stage_a``).
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

from codec.codec import compile_model, encode_pixels, load_encoder, load_stage_a
from codec.errors import CascadeError, UsageError

from .preprocess import POLICIES, RESIZE, Geometry, apply_geometry, geometry, known_buckets, preprocess
from .quantize import ChannelQuantization
from .sources import Sample, list_source, source_root
from .store import (FORMAT, FORMAT_VERSION, LATENT_CHANNELS, LatentStore, StoreError, StoreHook, array_dtype,
                    bucket_name, extras_dtype)

DTYPES = ("float16", "float32", "int8")


class SampleError(CascadeError):
    """One input cannot be used; ``str(e)`` is ``"reason: detail"``."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encoder_file(weights: str | os.PathLike) -> Path:
    """Local path of the file that holds the EfficientNet encoder in a weights source: ``effnet_encoder.safetensors``
    (folder or Hugging Face repo id), or a ComfyUI Stage C checkpoint, as :func:`codec.codec.load_encoder` reads."""
    from codec import weights as W
    from codec.layouts import locate as layouts

    src = W.WeightSource(weights)
    return src.path(layouts.locate_encoder(src).files[0])


TEXT_SUBFOLDERS = ("text_encoder", "tokenizer")


def files_sha256(paths: dict[str, Path]) -> str:
    """Digest of weights in ``{name: local path}``: the file's sha256 when there is one file, else the sha256 of
    the lines ``"<name> <sha256 of file>\\n"`` sorted by name (names are POSIX paths in the weight source)."""
    if len(paths) == 1:
        return file_sha256(next(iter(paths.values())))
    h = hashlib.sha256()
    for name in sorted(paths):
        h.update(f"{name} {file_sha256(paths[name])}\n".encode())
    return h.hexdigest()


def text_encoder_sha256(folder: Path) -> str:
    """Digest (:func:`files_sha256`) of every file under ``folder``'s ``text_encoder/`` and ``tokenizer/``."""
    return files_sha256({p.relative_to(folder).as_posix(): p for sub in TEXT_SUBFOLDERS
                         for p in (folder / sub).rglob("*") if p.is_file()})


def extras_identity(weights: str | os.PathLike, text_encoder: str | os.PathLike | None, stage_a: bool,
                    dtype: str) -> dict[str, Any]:
    """The ``extras`` attribute of a store for these options (``{}`` without extras); no model is built."""
    extras: dict[str, Any] = {}
    if text_encoder is not None:
        from transformers import CLIPTextConfig

        from codec.text import MAX_TOKENS
        from codec.weights import hf_subfolders

        folder = hf_subfolders(text_encoder, TEXT_SUBFOLDERS, "CLIP text embeddings (--text-encoder)")
        cfg = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
        extras["clip"] = {"source": str(text_encoder), "sha256": text_encoder_sha256(folder), "tokens": MAX_TOKENS,
                          "pooled_dim": cfg.projection_dim, "hidden_dim": cfg.hidden_size, "dtype": dtype}
    if stage_a:
        from codec import weights as W
        from codec.codec import locate_stage_a
        from codec.layouts import locate as layouts
        from codec.layouts import official

        src = W.WeightSource(weights)
        loc = locate_stage_a(src)
        _, config = layouts.open_component(src, loc)
        config = {**official.default_config("stage_a"), **(config or {})}  # as the loader builds it
        extras["stage_a"] = {"file": loc.label, "source": str(weights),
                             "sha256": files_sha256({f: src.path(f) for f in loc.files}),
                             "channels": int(config["c_latent"]), "scale_factor": float(config["scale_factor"]),
                             "dtype": dtype}
    return extras


def decode_image_uint8(data: bytes) -> torch.Tensor:
    """Image file bytes → upright RGB ``(3,h,w)`` uint8; :class:`SampleError` with a reason otherwise."""
    from codec.images import ImageReadError, load_image, pil_to_uint8

    try:
        return pil_to_uint8(load_image(data))
    except ImageReadError as e:
        raise SampleError(e.reason) from None


def decode_image(data: bytes) -> torch.Tensor:
    """Image file bytes → upright RGB ``(3,h,w)`` float in [0,1]; :class:`SampleError` with a reason otherwise."""
    from codec.images import from_uint8

    return from_uint8(decode_image_uint8(data))


def _resize_on_device(device: str | torch.device) -> bool:
    """Whether the encode job resizes on ``device`` in the main process (CUDA) rather than in the loader's workers."""
    return torch.device(device).type == "cuda"


class _UnitItems(torch.utils.data.Dataset):
    """Decode + preprocess one planned sample per item (runs in DataLoader workers); never raises for bad input.

    With ``raw`` the item carries the decoded uint8 image (``raw``) and its ``geometry`` instead of ``pixels``
    (:func:`_preprocess_raw` finishes it on the device)."""

    def __init__(self, items: list[tuple[int, Sample]], policy: str, size: int, raw: bool = False):
        self.items, self.policy, self.size, self.raw = items, policy, size, raw

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
            if self.raw:
                image = decode_image_uint8(data)
                # orig_size, crop_box and bucket travel inside the Geometry (older torch pinning made tuples lists)
                out.update(raw=image, geometry=geometry(*image.shape[-2:], self.policy, self.size))
            else:
                p = preprocess(decode_image(data), self.policy, self.size)
                out.update(pixels=p.pixels, orig_size=p.orig_size, crop_box=p.crop_box, bucket=p.bucket)
        except SampleError as e:
            out["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - a bad file must never stop the job; the reason is recorded
            out["error"] = f"unexpected error: {type(e).__name__}: {e}"
        return out


def _identity_collate(x):
    return x


def _preprocess_raw(item: dict[str, Any], device: str | torch.device) -> None:
    """Finish a raw item (see :class:`_UnitItems`) in place: uint8 → ``device`` → float → resize + crop as its
    geometry says; sets ``pixels`` (on ``device``), ``orig_size``, ``crop_box`` and ``bucket``."""
    from codec.images import from_uint8

    g: Geometry = item.pop("geometry")
    raw = item.pop("raw").to(device, non_blocking=True)
    item.update(pixels=apply_geometry(from_uint8(raw), g), orig_size=g.orig_size, crop_box=g.crop_box,
                bucket=g.bucket)


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
                   shard_size: int, extras: dict[str, Any] | None = None, model: str | None = None) -> dict[str, Any]:
    """The root attributes that must match for a run to resume or extend a store (``extras``: see
    :func:`extras_identity`), with two that need not: ``tool`` and ``model`` (the weights source that encoded,
    e.g. ``mini`` or a hub repo, which decode-dataset uses when no weights are given). An int8 store also gets
    ``quantization`` (:mod:`~datasets_tools.quantize`): fixed at creation, then read from the store by every writer."""
    quantization = {"latents": ChannelQuantization.symmetric(LATENT_CHANNELS).to_json()} if dtype == "int8" else None
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "encoder": {"file": encoder_path.name, "sha256": sha256},
            "preprocess": {"policy": policy, "size": size, "resize": RESIZE, "factor": 32},
            "dtype": dtype, "latent_channels": LATENT_CHANNELS, "shard_size": shard_size, "extras": extras or {},
            "tool": _tool_version(), **({"model": model} if model else {}),
            **({"quantization": quantization} if quantization else {})}


def store_model(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> str | None:
    """The weights source that encoded a store: its ``model`` attribute; for stores written before that was
    recorded, the built-in model whose encoder file has the recorded sha256; else ``None``."""
    from codec import weights as W

    attrs = LatentStore.open(url, storage_options).attrs
    if attrs.get("model"):
        return str(attrs["model"])
    digest = (attrs.get("encoder") or {}).get("sha256")
    for name, model in W.BUILTIN_MODELS.items():
        path = model.folder / W.EFFNET_FILE
        if digest and path.is_file() and file_sha256(path) == digest:
            return name
    return None


@dataclass
class _Models:
    """What runs in the main process: the EfficientNet encoder and the optional extras' models."""

    effnet: torch.nn.Module
    text: Any = None          # codec.text.TextEncoder
    stage_a: torch.nn.Module | None = None
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None  # effnet.encode compiled (compile=True)


@dataclass(frozen=True)
class EncodeJob:
    """The settings of one :func:`encode_dataset` call (see there), handed to the steps of the job."""

    source: str | os.PathLike
    out: str | os.PathLike
    weights: str | os.PathLike
    policy: str
    size: int
    batch_size: int
    workers: int
    dtype: str
    limit: int | None
    dry_run: bool
    shard_size: int
    progress: bool
    storage_options: dict[str, Any] | None
    device: str
    log: Callable[[str], None]
    text_encoder: str | os.PathLike | None
    stage_a: bool
    hook: StoreHook | None
    compile: bool = False


def encode_dataset(source: str | os.PathLike, out: str | os.PathLike, weights: str | os.PathLike,
                   policy: str = "center", size: int = 768, batch_size: int = 8, workers: int = 2,
                   dtype: str = "float16", limit: int | None = None, dry_run: bool = False, shard_size: int = 256,
                   progress: bool = True, storage_options: dict[str, Any] | None = None, device: str = "cpu",
                   log: Callable[[str], None] = print, text_encoder: str | os.PathLike | None = None,
                   stage_a: bool = False, hook: StoreHook | None = None, compile: bool = False) -> Summary:
    """Encode every readable image of ``source`` into the latent store ``out`` (resumable; see module doc).

    ``text_encoder`` (a folder with ``text_encoder/`` and ``tokenizer/``, or a repo id) adds
    CLIP text embeddings of the captions; ``stage_a`` adds Stage A latents (needs
    ``stage_a.safetensors`` in ``weights``). A store keeps the extras it was made with. ``hook`` is
    told each point where a kill must leave a resumable store (:data:`~datasets_tools.store.StoreHook`).
    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) units are split across ranks and
    synchronised with gloo barriers. ``compile=True`` runs the encoder through ``torch.compile``
    (:func:`codec.codec.compile_model`; the first batch of each size compiles). Returns a :class:`Summary` (this rank's counts,
    plus the store's totals on rank 0).
    """
    if policy not in POLICIES:
        raise UsageError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1 or workers < 0:
        raise UsageError("shard_size and batch_size must be ≥ 1 and workers ≥ 0")
    if size < 32 or size % 32:
        raise UsageError(f"size must be a positive multiple of 32, got {size}")
    from codec.devices import resolve_device

    device = str(resolve_device(device))  # "auto" → this process's GPU or the CPU; a missing device is refused
    t0 = time.perf_counter()
    rank, world = _dist_info()
    own_group = world > 1 and not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        job = EncodeJob(source, out, weights, policy, size, batch_size, workers, dtype, limit, dry_run, shard_size,
                        progress, storage_options, device, log, text_encoder, stage_a, hook, compile)
        return _run(job, rank, world, t0)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _run(job: EncodeJob, rank: int, world: int, t0: float) -> Summary:
    """Plan (rank 0), encode this rank's units and finalise (rank 0) the job; returns this rank's summary."""
    summary = Summary(dry_run=job.dry_run)
    root = source_root(job.source)

    # ---- plan (rank 0); everybody learns of a refusal before any work
    error = None
    if rank == 0:
        try:
            path = encoder_file(job.weights)
            identity = store_identity(path, file_sha256(path), job.policy, job.size, job.dtype, job.shard_size,
                                      extras_identity(job.weights, job.text_encoder, job.stage_a,
                                                      extras_dtype(job.dtype)),
                                      model=str(job.weights))
            samples = list_source(job.source, job.limit)
            if not samples:
                raise StoreError(f"{job.source}: no images found (extensions: jpg jpeg png webp bmp tif tiff)")
            store = LatentStore.open_for_writing(job.out, identity, job.storage_options, create=not job.dry_run,
                                                 hook=job.hook)
            plan = store.read_plan(root) if store is not None else []
            planned = {s.id for unit in plan for s in unit}
            new = [s for s in samples if s.id not in planned]
            new_units = [new[i:i + job.shard_size] for i in range(0, len(new), job.shard_size)]
            committed = store.committed_units() if store is not None else set()
            summary.listed, summary.new_samples = len(samples), len(new)
            summary.units_pending = len(plan) + len(new_units) - len(committed)
            if job.dry_run:
                state = ("absent (would be created)" if store is None
                         else f"{len(plan)} unit(s) planned, {len(committed)} committed")
                job.log(f"source: {job.source}: {len(samples)} samples; store {job.out}: {state}")
                job.log(f"would plan {len(new)} new sample(s) in {len(new_units)} new unit(s) of {job.shard_size}; "
                        f"would encode {summary.units_pending} unit(s) with policy={job.policy} size={job.size} "
                        f"dtype={job.dtype}")
            else:
                if store.attrs.get("source_root") != root:  # informational: where relative sources were last found
                    store.group.attrs.update({"source_root": root})
                # provenance: every run that encodes into the store, with the device(s) and precision it computes
                # in (a run with nothing to do leaves a finished store untouched)
                if summary.units_pending:
                    runs = list(store.attrs.get("runs") or [])
                    runs.append({"device": job.device, "processes": world, "precision": "float32",
                                 "tool": _tool_version(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                    store.group.attrs.update({"runs": runs})
                store.append_units(new_units, len(plan), root)
                store.set_capacity(len(plan) + len(new_units), known_buckets(job.policy, job.size))
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, then re-raised
            error = e
    msg = _broadcast_error(None if error is None else f"{type(error).__name__}: {error}", world)
    if error is not None:
        raise error
    if msg is not None:
        raise StoreError(f"rank 0 refused: {msg}")
    if job.dry_run:
        summary.seconds = time.perf_counter() - t0
        return summary

    # ---- process this rank's uncommitted units
    store = LatentStore.open(job.out, job.storage_options, mode="r+", hook=job.hook)
    plan = store.read_plan(root)
    n_units = len(plan)
    committed = store.committed_units()
    mine = [k for k in range(n_units) if k % world == rank and k not in committed]
    summary.units_pending = len(mine)
    items = [(k, s) for k in mine for s in plan[k]]
    text = None
    finalising = rank == 0 and (len(committed) < n_units or not store.attrs.get("complete"))
    if job.text_encoder is not None and (items or finalising and store.empty_text() is None):
        from codec.text import TextEncoder

        text = TextEncoder.from_pretrained(job.text_encoder, device=job.device)
    if items:
        effnet = load_encoder(job.weights, job.device)
        models = _Models(effnet, text, load_stage_a(job.weights, job.device) if job.stage_a else None,
                         compile_model(effnet.encode) if job.compile else None)
        _process(store, models, items, plan, n_units, job, summary)
    _barrier(world)

    # ---- finalise (rank 0); a finished store with nothing new is left untouched
    if rank == 0:
        if finalising:
            if text is not None and store.empty_text() is None:
                _store_empty_text(store, text)
            summary.store = store.finalise(n_units)
        else:
            summary.store = store.attrs
    _barrier(world)
    summary.seconds = time.perf_counter() - t0
    return summary


# What produced each stored array (for skip reasons).
_PRODUCERS = {"latents": "encoder", "clip_text_pooled": "text encoder", "clip_text": "text encoder",
              "stage_a": "Stage A encoder"}
FLOAT16_MAX = 65504.0


def _unstorable(key: str, t: torch.Tensor, dtype: str) -> str | None:
    """Why one sample's array cannot be stored in a store of ``dtype`` (NaN/inf, or beyond float16's range; int8
    latents are clamped instead), else ``None``."""
    if not torch.isfinite(t).all():
        return f"{_PRODUCERS[key]} produced NaN/inf"
    if array_dtype(key, dtype) == "float16" and t.abs().max().item() > FLOAT16_MAX:
        return f"{_PRODUCERS[key]} output beyond the float16 range (use --dtype float32)"
    return None


def _store_empty_text(store: LatentStore, text: Any) -> None:
    """Store the embeddings of ``""`` once (trainers need them for caption dropout); skipped when unstorable."""
    emb = text.encode([""], warn=False)
    hidden, pooled = emb.hidden[0].cpu(), emb.pooled[0].cpu()
    if _unstorable("clip_text", hidden, store.attrs["dtype"]) or _unstorable("clip_text_pooled", pooled,
                                                                             store.attrs["dtype"]):
        return
    store.write_empty_text(hidden.numpy(), pooled.numpy())


@torch.no_grad()
def _encode_arrays(models: _Models, pixels: torch.Tensor, captions: list[str], device: str) -> dict[str, torch.Tensor]:
    """Every stored float array of one batch, fp32 on the CPU: ``latents`` and the extras asked for."""
    out = {"latents": encode_pixels(models.effnet, pixels, models.encode)}
    if models.stage_a is not None:
        out["stage_a"] = models.stage_a.encode(pixels.to(device, torch.float32)).float().cpu()
    if models.text is not None:
        emb = models.text.encode(captions, warn=False)  # long captions are recorded as warnings instead
        out["clip_text_pooled"], out["clip_text"] = emb.pooled.cpu(), emb.hidden.cpu()
    return out


def _process(store: LatentStore, models: _Models, items: list[tuple[int, Sample]],
             plan: list[list[Sample]], n_units: int, job: EncodeJob, summary: Summary) -> None:
    from codec.interrupts import check_interrupted, ignore_interrupts, start_workers
    from codec.progress import progress_bar
    from codec.text import MAX_TOKENS

    raw = _resize_on_device(job.device)
    pin = raw and torch.device(job.device).type == "cuda" and torch.cuda.is_available()
    loader = torch.utils.data.DataLoader(
        _UnitItems(items, job.policy, job.size, raw), batch_size=None, shuffle=False, num_workers=job.workers,
        collate_fn=_identity_collate, prefetch_factor=max(2, job.batch_size) if job.workers else None,
        persistent_workers=False, pin_memory=pin, worker_init_fn=ignore_interrupts)
    bar = progress_bar(len(items), "encode-dataset", unit="img", enabled=None if job.progress else False,
                       smoothing=0.05)
    remaining = {k: len(plan[k]) for k in {k for k, _ in items}}
    unit_state: dict[int, dict[str, Any]] = {}
    dtype = store.attrs["dtype"]
    quantization = store.quantization()

    def state(k: int) -> dict[str, Any]:
        return unit_state.setdefault(k, {"pending": {}, "rows": {}, "errors": [], "warnings": [], "clamped": 0,
                                         "t0": time.perf_counter()})

    def skip(st: dict[str, Any], b: dict[str, Any], reason: str) -> None:
        st["errors"].append([b["id"], b["source"], reason])
        key = reason.split(":", 1)[0]
        summary.reasons[key] = summary.reasons.get(key, 0) + 1
        summary.skipped += 1

    def encode_batch(st: dict[str, Any], bucket: tuple[int, int]) -> None:
        batch = st["pending"].pop(bucket, [])
        if not batch:
            return
        arrays = _encode_arrays(models, torch.stack([b["pixels"] for b in batch]), [b["caption"] for b in batch],
                                job.device)
        rows = st["rows"].setdefault(bucket, {key: [] for key in (*arrays, "id", "source", "caption", "orig_size",
                                                                   "crop_box")})
        for i, b in enumerate(batch):
            reason = next((r for key, t in arrays.items() if (r := _unstorable(key, t[i], dtype))), None)
            if reason is not None:
                skip(st, b, reason)
                continue
            for key, t in arrays.items():
                rows[key].append(store.to_storage(key, t[i].numpy()))  # storage dtype now: a unit's rows stay small
            if quantization is not None:
                st["clamped"] += quantization.clamped(arrays["latents"][i].numpy())
            for key in ("id", "source", "caption", "orig_size", "crop_box"):
                rows[key].append(b[key])
            if models.text is not None and (cut := models.text.truncated_part(b["caption"])) is not None:
                st["warnings"].append([b["id"], b["source"], f"caption longer than {MAX_TOKENS} CLIP tokens; the "
                                                             f"text embedding ignores: {cut[:200]}"])

    for item in start_workers(loader):
        check_interrupted()  # Ctrl-C stops at the next image even if its KeyboardInterrupt was lost
        k = item["unit"]
        st = state(k)
        if item["warning"]:
            st["warnings"].append([item["id"], item["source"], item["warning"]])
        if not item["error"] and "raw" in item:
            try:
                _preprocess_raw(item, job.device)
            except Exception as e:  # noqa: BLE001 - as in the workers: recorded, never fatal
                item["error"] = f"unexpected error: {type(e).__name__}: {e}"
        if item["error"]:
            skip(st, item, item["error"])
        else:
            pend = st["pending"].setdefault(item["bucket"], [])
            pend.append(item)
            if len(pend) >= job.batch_size:
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
                             **({"clamped": st["clamped"]} if quantization is not None else {}),
                             "elapsed": round(time.perf_counter() - st["t0"], 3), "rank": _dist_info()[0]})
            summary.encoded += sum(counts.values())
            summary.warnings += len(st["warnings"])
            summary.units_done += 1
            del unit_state[k]
            bar.set_postfix(units=summary.units_done, skipped=summary.skipped)
    bar.close()
