#!/usr/bin/env python3
"""Turn the mini codec's training runs into the files the package ships (codec/mini/, the official file layout).

    python scripts/export_mini.py stage-a out/mini/stage_a out/mini/stage_a.safetensors
        Stage A from its run's checkpoint, with its scale factor calibrated: the std of its (unscaled) latents over
        the training tiles, so that Stage B sees unit-variance latents as the official 0.43 gives the official one.
    python scripts/export_mini.py codec out/mini/codec out/mini/stage_a.safetensors out/mini/codec-pkg
        stage_a.safetensors, effnet_encoder.safetensors, stage_b_mini.safetensors and clip_pooled_empty.safetensors
        (the constant text condition Stage B was trained with: zeros) into the folder: the codec that
        `cascade train decoder` then fine-tunes Stage A's decoder on.
    python scripts/export_mini.py codec out/mini/codec out/mini/decoder/checkpoint/model.safetensors codec/mini
        the same with that fine-tuned Stage A: the package's files (RUN may also be the codec-pkg folder).

    python scripts/export_mini.py end-to-end out/mini/e2e codec/mini
        the three models of a `cascade train end-to-end` run (configs/mini/end_to_end.yaml), with the sampler
        defaults of the codec it fine-tuned.

All read ``OUTPUT_DIR/checkpoint/model.safetensors`` of a `cascade train` run (the latest checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MINI_NOTE = ("cascade-codec mini codec: trained from scratch by this project on Debian's freely licensed photos "
             "(codec/mini/MODEL_CARD.md); 256² native; NOT Stable Cascade and far below its quality")


# The sampler the mini Stage B is decoded with by default (Codec.sampler_defaults), written into its file with the
# run's prediction (v): one deterministic step from pure noise, i.e. Stage B's regression of the Stage A latent on
# the encoder's, which Stage A's decoder is then fine-tuned to decode (`cascade train decoder`). More steps were
# worse on training tiles (MODEL_CARD.md).
SAMPLING = {"steps": 1, "sampler": "ddim", "cfg": 1.0}


def _checkpoint(run: Path) -> Path:
    from codec.training import checkpoint as ckpt

    path = ckpt.checkpoint_dir(run) / ckpt.MODEL_FILE
    if not path.is_file():
        raise SystemExit(f"export_mini: {path} does not exist; train first (see configs/mini/*.yaml)")
    return path


def _run_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def export_stage_a(run: Path, out: Path, images: Path, n: int = 64) -> float:
    """Write Stage A of ``run`` to ``out`` with the scale factor calibrated on ``n`` images of ``images``;
    returns the scale factor."""
    from codec import weights as W
    from codec.stage_a import StageA
    from datasets_tools.image_dataset import ImageDataset

    src = _checkpoint(run)
    model, header = W.load_configured(StageA, src, None, torch.float32, "cpu")
    data = ImageDataset(images, size=256)
    step = max(1, len(data) // n)
    x = torch.stack([data[i]["images"] for i in range(0, len(data), step)][:n])
    with torch.no_grad():
        z = torch.cat([model.encode(b) * model.scale_factor for b in x.split(8)])
    scale = round(float(z.std()), 4)
    config = {**header.config, "scale_factor": scale}
    state = dict(W.iter_tensors(header, torch.float32))
    W.save_state(state, out, config=config, note=MINI_NOTE)
    print(f"{out}: Stage A, latent std over {len(x)} images {scale} → scale_factor {scale}")
    return scale


def _codec_parts(source: Path) -> tuple[dict, str]:
    """``{"effnet": (state, config), "stage_b": (state, config)}`` and Stage B's prediction, from a `cascade train
    codec` run or from a codec folder this script wrote (its encoder and Stage B files)."""
    from codec import weights as W
    from codec.training.codec_tasks import split_codec_state

    if not (source / W.EFFNET_FILE).is_file():
        return split_codec_state(_checkpoint(source)), _run_config(source)["prediction"]
    parts, headers = {}, {}
    for part, name in (("effnet", W.EFFNET_FILE), ("stage_b", W.STAGE_B_FILES["mini"]["fp32"])):
        headers[part] = header = W.read_header(source / name)
        parts[part] = dict(W.iter_tensors(header, torch.float32)), json.loads(header.metadata[W.META_CONFIG])
    return parts, json.loads(headers["stage_b"].metadata[W.META_SAMPLING])["prediction"]


def export_codec(run: Path, stage_a: Path, folder: Path, sampling: dict | None = None) -> None:
    """Write the four files of the mini codec into ``folder`` — the encoder and Stage B of ``run`` (a `cascade train
    codec` run, or a folder this function wrote), the Stage A file ``stage_a``; Stage B's sampler defaults are
    ``sampling`` (default :data:`SAMPLING`) plus the run's ``prediction``."""
    from codec import weights as W

    parts, prediction = _codec_parts(run)
    header = W.read_header(stage_a)
    parts["stage_a"] = dict(W.iter_tensors(header, torch.float32)), json.loads(header.metadata[W.META_CONFIG])
    write_codec(parts, folder, {**(SAMPLING if sampling is None else sampling), "prediction": prediction})


def export_end_to_end(run: Path, folder: Path) -> None:
    """Write the codec folder of a `cascade train end-to-end` run: its three models, with the sampler defaults of
    the codec it fine-tuned (the path it was trained through)."""
    from codec import Codec
    from codec.training.codec_tasks import split_codec_state

    named = Path(_run_config(run)["end_to_end"]["codec"])
    # a relative path is relative to where the run was started: here, or (the configs' paths) the repository
    found = next((p for p in (named, ROOT / named) if p.is_dir()), None)
    if found is None:
        raise SystemExit(f"export_mini: the codec this run fine-tuned ({named}, end_to_end.codec in {run}/config.json) "
                         "is not a folder here or in the repository; run from where the training ran, or put "
                         "that codec folder back (its sampler defaults go into the export)")
    source = Codec.from_pretrained(found, device="cpu", dtype=torch.float32)
    write_codec(split_codec_state(_checkpoint(run)), folder, source.sampling)


def write_codec(parts: dict, folder: Path, sampling: dict) -> None:
    """The mini codec's four files in ``folder`` from ``parts`` (``effnet``, ``stage_b``, ``stage_a``: (state,
    config)), Stage B's file carrying ``sampling`` (its sampler defaults and prediction)."""
    from codec import weights as W

    folder.mkdir(parents=True, exist_ok=True)
    state, config = parts["stage_a"]
    W.save_state(state, folder / W.STAGE_A_FILE, config=config, note=MINI_NOTE)
    state, config = parts["effnet"]
    W.save_state(state, folder / W.EFFNET_FILE, config=config, note=MINI_NOTE)
    state, config = parts["stage_b"]
    W.save_state(state, folder / W.STAGE_B_FILES["mini"]["fp32"], config=config, note=MINI_NOTE,
                 extra_metadata={W.META_SAMPLING: json.dumps(sampling)})
    W.save_state({"pooled": torch.zeros(1, 1, config["c_clip"])}, folder / W.EMPTY_CAPTION_FILE,
                 note="the mini codec's constant text condition (zeros; it has no text encoder)")
    for f in sorted(folder.glob("*.safetensors")):
        print(f"{f}: {f.stat().st_size:,} bytes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("stage-a", help="Stage A with a calibrated scale factor")
    a.add_argument("run", type=Path, help="output_dir of `cascade train stage-a`")
    a.add_argument("out", type=Path, help="the Stage A file to write")
    a.add_argument("--images", type=Path, default=ROOT / "data" / "photos" / "train-256",
                   help="training images to calibrate the scale factor on (default: data/photos/train-256)")
    c = sub.add_parser("codec", help="the package's files")
    c.add_argument("run", type=Path, help="output_dir of `cascade train codec`, or a codec folder this script wrote "
                                          "(its encoder and Stage B are taken)")
    c.add_argument("stage_a", type=Path, help="the Stage A file written by `export_mini.py stage-a`")
    c.add_argument("folder", type=Path, help="where to write (codec/mini to ship it)")
    c.add_argument("--sampling", type=json.loads, default=None,
                   help=f"Stage B's sampler defaults as JSON (default: {json.dumps(SAMPLING)})")
    e = sub.add_parser("end-to-end", help="the package's files from an end-to-end fine-tuning run")
    e.add_argument("run", type=Path, help="output_dir of `cascade train end-to-end`")
    e.add_argument("folder", type=Path, help="where to write (codec/mini to ship it)")
    args = ap.parse_args(argv)
    if args.what == "stage-a":
        export_stage_a(args.run, args.out, args.images)
    elif args.what == "end-to-end":
        export_end_to_end(args.run, args.folder)
    else:
        export_codec(args.run, args.stage_a, args.folder, args.sampling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
