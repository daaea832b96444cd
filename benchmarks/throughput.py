"""Images per second of the latent-dataset commands, ``cascade encode-dataset`` and ``cascade decode-dataset``.

Run ``python -m benchmarks.throughput --help`` for the options. Each row times, end to end and cold, the Python
call the command makes (``datasets_tools.encode.encode_dataset`` / ``Codec.from_pretrained`` then
``datasets_tools.decode.decode_dataset``) in this process, on ``--n`` real photos (``--images``; default the
project's held-out 256² photo crops ``data/photos/heldout-256`` from ``scripts/get_photos.py``, else the four
``scripts/samples`` photos), for two models:

* ``mini`` — the built-in codec (``--model mini``) at its native size (256² images, encoder input 192²,
  6×6 latents; its own sampler: 1 DDIM step without guidance);
* ``full`` — full-size architectures with random weights (EfficientNetV2-S encoder, Stage A, Stage B lite, drawn
  by :func:`benchmarks.speed.random_state_dict` as in the speed benchmark), written in the official file layout to
  a temporary folder (Stage B as its bf16 file), at ``--full-size`` (default 256²: encoder input 192², decoded by
  the official 10 DDPM steps with CFG 1.1). The images decoded are noise; the work is the real models'.

Rows:

* ``encode-dataset``: ``encode_dataset(images, fresh store, weights, size=…, batch_size, workers)`` — listing,
  decoding and resizing the photos in ``--workers`` DataLoader processes, loading the encoder, encoding, writing.
  The encoder always computes in fp32: it has no other precision (``--dtype``/``dtype="auto"`` choose Stage B's
  and Stage C's precision; encode-dataset's ``--dtype`` is the *storage* precision of the latents), so fp32 is
  also what ``auto`` runs and there is no bf16 encoder row.
* ``decode-dataset``: ``Codec.from_pretrained(weights, dtype="auto")`` (load seconds reported apart) then
  ``decode_dataset(store, fresh folder, codec, limit=--decode-n, batch_size=b)`` for each ``--decode-batches`` b,
  at the codec's default precision (bf16 Stage B on CPUs with AVX512_BF16/AMX-BF16 and on CUDA, else fp32).
  decode-dataset decodes each sample in its own ``Codec.decode`` call, so its ``--batch-size`` (the ``batch_size``
  of that call) does not change the work: the rows show what the option does today.
* ``--compile`` adds the same rows with ``compile=True`` (``--compile`` on the commands): their first batch or
  image pays for compiling, which is included, as a user of the command would see it.

images/s = images written / wall seconds of the call. ``--device`` runs the models on a GPU (``auto``: one when
there is one). For the 768² encoder on 1024-px photos, the pipeline against the bare model, see
:mod:`benchmarks.dataset`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .environment import device_arg, environment_record

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "throughput.json"
DEFAULT_IMAGES = (ROOT / "data" / "photos" / "heldout-256", ROOT / "scripts" / "samples")
RANDOM_NOTE = "RANDOM WEIGHTS (benchmarks.throughput) - full-size architectures, not a trained model"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_random_weights(folder: Path, seed: int = 0) -> Path:
    """Full-size EfficientNetV2-S, Stage A and Stage B lite (bf16 file) with random weights drawn as the speed
    benchmark draws them, plus a random empty-caption embedding, in the official file layout."""
    from safetensors.torch import save_file

    from codec import weights as W
    from codec.effnet import EfficientNetEncoder
    from codec.presets import create_model, get_preset

    from .speed import decode_clip, random_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        W.save_module(EfficientNetEncoder().eval(), folder / W.EFFNET_FILE, None, RANDOM_NOTE)
    for name, file, dtype in (("stage_a", W.STAGE_A_FILE, torch.float32),
                              ("stage_b_lite", W.STAGE_B_FILES["lite"]["bf16"], torch.bfloat16)):
        with torch.device("meta"):
            model = create_model(name)
        model.load_state_dict(random_state_dict(model, seed, dtype), strict=True, assign=True)
        W.save_module(model, folder / file, get_preset(name).kwargs(), RANDOM_NOTE)
        del model
    save_file({"pooled": decode_clip(seed).contiguous()}, str(folder / W.EMPTY_CAPTION_FILE),
              metadata={W.META_NOTE: RANDOM_NOTE})
    return folder


def find_images(given: Path | None) -> Path:
    if given is not None:
        return given
    for folder in DEFAULT_IMAGES:
        if folder.is_dir() and any(folder.glob("*.[jp][pn]g")):
            return folder
    raise SystemExit("no photos found; pass --images DIR (scripts/get_photos.py makes data/photos/)")


def time_encode(images: Path, store: Path, weights: str, size: int, args, compile_models: bool) -> dict[str, Any]:
    from datasets_tools.encode import encode_dataset

    t0 = time.perf_counter()
    summary = encode_dataset(images, store, weights, size=size, batch_size=args.batch_size, workers=args.workers,
                             limit=args.n, progress=False, device=args.device, log=lambda *_: None,
                             compile=compile_models)
    seconds = time.perf_counter() - t0
    return {"images": summary.encoded, "seconds": seconds, "images_per_s": summary.encoded / seconds}


def time_decode(store: Path, out: Path, weights: str, batch: int, args, compile_models: bool) -> dict[str, Any]:
    from codec import Codec
    from datasets_tools.decode import decode_dataset

    t0 = time.perf_counter()
    codec = Codec.from_pretrained(weights, device=args.device, dtype="auto", compile=compile_models)
    load = time.perf_counter() - t0
    defaults = codec.sampler_defaults
    t0 = time.perf_counter()
    summary = decode_dataset(store, out, codec, limit=args.decode_n, progress=False, steps=defaults["steps"],
                             cfg=defaults["cfg"], sampler=defaults["sampler"], seed=0, batch_size=batch)
    seconds = time.perf_counter() - t0
    return {"images": summary.written, "load_s": load, "seconds": seconds,
            "images_per_s": summary.written / seconds, "precision": codec.dtype_reason,
            "sampler": f"{defaults['steps']} {defaults['sampler']} step(s), "
                       + ("no CFG" if defaults["cfg"] in (None, 1, 1.0) else f"CFG {defaults['cfg']}")}


def run_model(name: str, weights: str, images: Path, size: int, tmp: Path, args) -> list[dict[str, Any]]:
    from codec.codec import encoder_input_size

    enc_size = encoder_input_size(size, size)[0]
    rows: list[dict[str, Any]] = []
    for compiled in [False] + ([True] if args.compile else []):
        tag = " + compile" if compiled else ""
        store = tmp / f"store_{name}_{int(compiled)}"
        log(f"{name}{tag}: encode-dataset of {args.n} photo(s) at {enc_size}² ...")
        r = time_encode(images, store, weights, enc_size, args, compiled)
        rows.append({"model": name, "command": "encode-dataset", "compile": compiled, "size": size,
                     "encoder_input": enc_size, "precision": "fp32 (the encoder's only precision; auto = fp32)",
                     "batch": args.batch_size, **r})
        log(f"  {r['images']} images in {r['seconds']:.1f} s = {r['images_per_s']:.2f} images/s")
        for b in args.decode_batches:
            out = tmp / f"out_{name}_{int(compiled)}_{b}"
            log(f"{name}{tag}: decode-dataset of {args.decode_n} latent(s), --batch-size {b} ...")
            r = time_decode(store, out, weights, b, args, compiled)
            rows.append({"model": name, "command": "decode-dataset", "compile": compiled, "size": size,
                         "batch": b, **r})
            log(f"  {r['images']} images in {r['seconds']:.1f} s = {r['images_per_s']:.3f} images/s "
                f"(load {r['load_s']:.1f} s; {r['precision']})")
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    return rows


def format_table(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    cpu = env["cpu"]
    device = env.get("device", "cpu")
    where = env.get("cuda_device", device) if device.startswith("cuda") else \
        f"{cpu['model']} ({cpu['torch_cpu_capability']}), {env['threads']} threads"
    lines = [(f"cascade-codec dataset throughput — torch {env['torch']}, {where}; the codec's dtype=auto here: "
              f"{cpu.get('auto_precision') if device == 'cpu' else 'bf16 (CUDA)'}"),
             ("images/s = images written / wall seconds of the command's call (cold: includes loading the encoder "
              "for encode-dataset; decode-dataset's codec load is the load s column)"), ""]
    head = f"{'command':<15} {'model':<5} {'image':<6} {'precision':<26} {'batch':>5} {'images':>6} {'seconds':>8} " \
           f"{'images/s':>9} {'load s':>7}  sampler"
    lines += [head, "-" * len(head)]
    for r in rows:
        prec = "fp32 (only; auto = fp32)" if r["command"] == "encode-dataset" else r["precision"].split(":")[0]
        prec += " +compile" if r["compile"] else ""
        load = f"{r['load_s']:.1f}" if "load_s" in r else "-"
        lines.append(f"{r['command']:<15} {r['model']:<5} {str(r['size']) + '²':<6} {prec:<26} {r['batch']:>5} "
                     f"{r['images']:>6} {r['seconds']:>8.1f} {r['images_per_s']:>9.3f} {load:>7}  "
                     f"{r.get('sampler', 'encoder input ' + str(r.get('encoder_input')) + '²')}")
    lines += ["", "notes:",
              ("* encode-dataset: the EfficientNet encoder has no precision option; it always computes in fp32 (the "
               "command's --dtype is the latents' storage precision), so auto runs fp32 too."),
              ("* decode-dataset decodes the samples in groups of --batch-size, one Codec.decode call per group "
               "(latents of one size in one Stage B batch)."),
              ("* full = full-size architectures with random weights (the images are noise; the work is the real "
               "models'); mini = the built-in codec.")]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput",
                                description="images/s of cascade encode-dataset and decode-dataset on the built-in "
                                            "mini codec and on full-size random weights.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="expected runtime (2 CPU threads, defaults): mini ~1–2 min; full at 256² "
                                       "~5 min (each decode ~20–40 s: 10 steps with CFG of Stage B lite).")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of photos (default: data/photos/heldout-256, else scripts/samples)")
    p.add_argument("--models", default="mini,full", help="comma-separated: mini, full (default: mini,full)")
    p.add_argument("--n", type=int, default=64, help="photos to encode (default: 64)")
    p.add_argument("--decode-n", type=int, default=None,
                   help="latents to decode per row (default: 16 for mini, 2 for full)")
    p.add_argument("--decode-batches", default="1,4", help="decode-dataset --batch-size values (default: 1,4)")
    p.add_argument("--full-size", type=int, default=256,
                   help="image side of the full-size model's rows, multiple of 32 (default: 256)")
    p.add_argument("--batch-size", type=int, default=8, help="encode-dataset --batch-size (default: 8)")
    p.add_argument("--workers", type=int, default=2, help="encode-dataset --workers (default: 2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--compile", action="store_true", help="also the rows with --compile (torch.compile)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                   help="JSON report (default: benchmarks/results/throughput.json)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in ("mini", "full") for m in args.models):
        p.error("--models: choose from mini, full")
    try:
        args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]
    except ValueError:
        p.error("--decode-batches must be comma-separated integers")
    if args.full_size % 32 or args.full_size < 64:
        p.error("--full-size must be a multiple of 32, at least 64")
    if min([args.n, args.batch_size, args.threads, *args.decode_batches]) < 1 or args.workers < 0:
        p.error("--n, --batch-size, --threads and --decode-batches must be >= 1, --workers >= 0")
    args.device = device_arg(p, args.device)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    images = find_images(args.images)
    env = environment_record(dirty_paths=("codec", "datasets_tools"), threads=args.threads, device=args.device)
    rows: list[dict[str, Any]] = []
    decode_n = args.decode_n
    with tempfile.TemporaryDirectory(prefix="cascade_throughput_") as tmp:
        for name in args.models:
            from codec import weights as W

            args.decode_n = decode_n or (16 if name == "mini" else 2)
            if name == "mini":
                weights, size = "mini", W.BUILTIN_MODELS["mini"].native_size
            else:
                log("writing full-size random weights ...")
                weights, size = str(write_random_weights(Path(tmp) / "weights", args.seed)), args.full_size
            rows += run_model(name, weights, images, size, Path(tmp), args)
    args.decode_n = decode_n
    report = {"environment": env, "images": str(images),
              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(format_table(rows, env))
    print(f"\nphotos: {images}; JSON written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
