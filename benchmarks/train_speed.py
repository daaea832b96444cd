"""Training throughput (samples/s) of `cascade train` tasks on a device, through their real data paths.

    python -m benchmarks.train_speed --device cuda                 # on a GPU: the figures of issue 22
    python -m benchmarks.train_speed --device cpu --tasks codec --codec-batch 8 --steps 6 --warmup 2

What runs, each as ``codec.training.train`` runs it for ``cascade train`` (one process), for ``--warmup`` +
``--steps`` updates, logging every update; the figure is the median ``samples_per_s`` of the updates after the
warm-up (``log.jsonl``; the first updates hold cuDNN autotuning, allocator growth and the loader's start):

* ``codec``: the built-in codec's recipe (``configs/mini/release/codec.yaml``: encoder + Stage B jointly on the frozen
  Stage A, bf16 autocast, 256² crops) on ``--images`` (default ``data/photos/train-320``, from
  ``scripts/get_photos.py``), with ``data.cache`` (images decoded once into memory as uint8, cropped on the device);
  Stage A is the shipped ``codec/mini/stage_a.safetensors``.
* ``lora``: LoRA (rank 4, attention layers) on Stage C lite at 24×24 latents, from a latent store with stored CLIP
  text embeddings, read by ``LatentDataset`` through ``--workers`` DataLoader workers. The store is made once
  (``encode-dataset`` of ``--photos`` at 768² with the built-in encoder and a small random CLIP text encoder of
  Stage C's width 1280) and Stage C lite is full size with random weights (the official architecture: the speed
  is the official model's; the weights are not). ``--preset tiny`` uses the tiny Stage C and text encoder (tests).

Prints a table and writes JSON (``-o``) with the device, its name, the CPU count and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .environment import device_arg, environment_record

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("codec", "lora")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "train_speed.json"


def log(msg: str) -> None:
    print(f"[train_speed] {msg}", file=sys.stderr, flush=True)


def _measure(task_name: str, cfg: dict[str, Any], dataset: Any, device: str, warmup: int) -> dict[str, Any]:
    """Train ``cfg`` (a config dict) with task ``task_name``; samples/s of the updates after ``warmup``."""
    from codec.generation.training import TASKS as GENERATION_TASKS
    from codec.training import TASKS as CODEC_TASKS
    from codec.training import task_class, train
    from codec.training.logs import read_log

    t = time.perf_counter()
    train(task_class(task_name, {**CODEC_TASKS, **GENERATION_TASKS}), cfg, dataset, echo=None, device=device)
    wall = time.perf_counter() - t
    rows = read_log(cfg["output_dir"])
    timed = [r["samples_per_s"] for r in rows if r["step"] > warmup]
    if not timed:
        raise SystemExit(f"train_speed: {task_name} logged no update after the warm-up of {warmup}")
    return {"samples_per_s": statistics.median(timed), "samples_per_s_all": [r["samples_per_s"] for r in rows],
            "batch_size": cfg["batch_size"], "updates": len(rows), "wall_s": wall,
            "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]]}


def codec_case(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The built-in codec's recipe (see the module docstring)."""
    from datasets_tools.training_data import training_dataset

    if not args.images.is_dir():
        raise SystemExit(f"train_speed: {args.images} is not a folder; run `python scripts/get_photos.py --crop-size 0 "
                         "--scaled-tiles 320 256` first, or give --images")
    cfg = yaml.safe_load((ROOT / "configs" / "mini" / "release" / "codec.yaml").read_text())
    cfg.update(output_dir=str(tmp / "codec"), batch_size=args.codec_batch, max_steps=args.warmup + args.steps,
               log={"every": 1}, checkpoint={"save_every": 10 ** 9}, preview={"every": 0})
    cfg["data"].update(images=str(args.images), cache=True, num_workers=0)
    cfg["codec"]["stage_a"] = str(ROOT / "codec" / "mini" / "stage_a.safetensors")
    cfg["optim"]["warmup_updates"] = 0
    return _measure("codec", cfg, training_dataset, args.device, args.warmup)


def lora_store(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, Path]:
    """(store, Stage C lite file, text encoder folder) for the LoRA case, made in ``tmp``."""
    from benchmarks.speed import random_state_dict
    from codec import weights as W
    from codec.presets import create_model
    from codec.tiny import write_tiny_text_encoder
    from codec.training.task import model_config
    from datasets_tools import encode_dataset

    text = write_tiny_text_encoder(tmp / "text", **({} if args.preset == "tiny" else {"width": 1280}))
    preset = "stage_c_tiny" if args.preset == "tiny" else "stage_c_lite"
    with torch.device("meta"):
        meta = create_model(preset)
    stage_c = tmp / "stage_c.safetensors"
    W.save_state(random_state_dict(meta, args.seed, torch.bfloat16), stage_c, config=model_config(meta),
                 note=f"random {preset} weights for benchmarks.train_speed (not a trained model)")
    store = tmp / "lora.zarr"
    log(f"encoding {args.photos} into {store} (768², built-in encoder, random CLIP text encoder)")
    encode_dataset(args.photos, store, "mini", size=64 if args.preset == "tiny" else 768, batch_size=8,
                   workers=args.workers, text_encoder=text, progress=False, log=lambda s: None)
    return store, stage_c, text


def lora_case(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """LoRA on Stage C lite from a latent store (see the module docstring)."""
    from datasets_tools.training_data import training_dataset

    store, stage_c, _ = lora_store(args, tmp)
    cfg = {"output_dir": str(tmp / "lora"), "data": {"store": str(store), "num_workers": args.workers},
           "model": {"checkpoint": str(stage_c)}, "batch_size": args.lora_batch,
           "max_steps": args.warmup + args.steps, "mixed_precision": "bf16", "optim": {"warmup_updates": 0},
           "log": {"every": 1}, "checkpoint": {"save_every": 10 ** 9}, "preview": {"every": 0},
           "lora": {"rank": 4, "module_filters": [".attn"], "export_kohya": False}}
    return _measure("lora", cfg, training_dataset, args.device, args.warmup)


def format_table(results: dict[str, dict[str, Any]], env: dict[str, Any]) -> str:
    """The printed table."""
    lines = [f"training throughput on {env['device']} ({env.get('device_name', '')}), {env.get('cpu_count')} CPUs, "
             f"torch {torch.__version__}", "", "| task | batch | samples/s (median after warm-up) | updates | wall s |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['batch_size']} | {r['samples_per_s']:,.1f} | {r['updates']} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    p.add_argument("--steps", type=int, default=40, help="timed updates per task (default: 40)")
    p.add_argument("--warmup", type=int, default=10, help="updates before the timed ones (default: 10)")
    p.add_argument("--codec-batch", type=int, default=None,
                   help="codec recipe batch size (default: 256 on CUDA, the issue's target; 8 on the CPU)")
    p.add_argument("--lora-batch", type=int, default=None, help="LoRA batch size (default: 32 on CUDA, 2 on the CPU)")
    p.add_argument("--images", type=Path, default=ROOT / "data" / "photos" / "train-320",
                   help="image folder of the codec recipe (default: data/photos/train-320)")
    p.add_argument("--photos", type=Path, default=ROOT / "scripts" / "samples",
                   help="photos encoded into the LoRA case's store (default: scripts/samples)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the LoRA case (default: 2)")
    p.add_argument("--preset", choices=("full", "tiny"), default="full",
                   help="LoRA case: full-size Stage C lite (default) or the tiny test model")
    p.add_argument("--seed", type=int, default=0, help="seed of the random Stage C weights (default: 0)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="JSON report (default: %(default)s)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or any(t not in TASKS for t in args.tasks):
        p.error(f"--tasks: choose from {','.join(TASKS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be ≥ 1 and --warmup ≥ 0")
    args.device = device_arg(p, args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the cases, print the table, write the JSON."""
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.codec_batch = args.codec_batch or (256 if cuda else 8)
    args.lora_batch = args.lora_batch or (32 if cuda else 2)
    env = {**environment_record(packages=("torch",)), "device": args.device, "cpu_count": os.cpu_count()}
    if cuda:
        env["device_name"] = torch.cuda.get_device_name(args.device)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cascade_train_speed_") as tmp:
        for name in args.tasks:
            log(f"{name} …")
            results[name] = (codec_case if name == "codec" else lora_case)(args, Path(tmp))
            log(f"{name}: {results[name]['samples_per_s']:,.1f} samples/s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"environment": env, "options": {k: str(v) for k, v in vars(args).items()},
                                       "results": results}, indent=2))
    print(format_table(results, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
