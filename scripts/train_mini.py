#!/usr/bin/env python3
"""Train the built-in mini codec's three steps in a fixed wall-clock budget (the GPU recipe of codec/mini/MODEL_CARD.md).

    python scripts/train_mini.py --device cuda --out out/mini-gpu --seconds 90,230,60

Each step is ``configs/mini/{stage_a,codec,decoder}.yaml`` with the batch size, learning rate, data folder and
output folder of this script's options. Before each step a short calibration run (``calibrate`` updates, in
OUT/calibrate-STEP, thrown away) measures the updates per second on this machine, and ``max_steps`` is set so that
the step fills its share of ``--seconds``: the cosine schedule then decays to zero within the budget. The configs
actually trained are written to OUT/configs/ (commit those to reproduce the run without calibrating). After each
step its result is exported (scripts/export_mini.py) into OUT/pkg-base/ (Stage A + encoder + Stage B before the
decoder fine-tune) and OUT/pkg/ (the finished codec, the layout of codec/mini/). Run it again after a stop: every
training run resumes from its checkpoint; calibrations are not repeated once their configs exist.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("stage_a", "codec", "decoder")
TASKS = {"stage_a": "stage-a", "codec": "codec", "decoder": "decoder"}


def _train(task: str, config: Path, device: str, timeout: float | None = None) -> None:
    cmd = [sys.executable, "-m", "codec.cli", "train", task, str(config), "--device", device]
    print("$", " ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{task}: stopped at its time limit ({timeout:.0f} s); its last checkpoint is used", flush=True)


def _rate(run: Path) -> float:
    """Updates per second of a finished calibration run (median over its log windows, the first one dropped: it
    holds the start-up)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    if len(rows) < 2:
        raise SystemExit(f"train_mini: calibration {run} logged {len(rows)} window(s); raise --calibrate")
    batch = json.loads((run / "config.json").read_text())["batch_size"]
    return statistics.median(r["samples_per_s"] for r in rows[1:]) / batch


def _config(step: str, out: Path, args: argparse.Namespace) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "mini" / f"{step}.yaml").read_text())
    batch, lr = args.batch[step], args.lr[step]
    cfg.update(output_dir=str(out / step), batch_size=batch)
    cfg["optim"].update(lr=lr, warmup_updates=args.warmup[step])
    cfg["data"].update(images=str(args.images), num_workers=args.workers, cache=args.cache)
    cfg["checkpoint"] = {"save_every": 200}
    if step == "codec":
        cfg["codec"]["stage_a"] = str(out / "stage_a.safetensors")
    if step == "decoder":
        cfg["model"]["checkpoint"] = str(out / "stage_a.safetensors")
        cfg["decoder"]["codec"] = str(out / "pkg-base")
    return cfg


def _write(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_step(step: str, seconds: float, out: Path, args: argparse.Namespace) -> None:
    """Calibrate (once), then train ``step`` for about ``seconds``."""
    final = out / "configs" / f"{step}.yaml"
    if not final.exists():
        cal = _config(step, out, args)
        cal.update(output_dir=str(out / f"calibrate-{step}"), max_steps=args.calibrate)
        cal["log"] = {"every": max(1, args.calibrate // 6)}
        cal["preview"] = {"every": 0}
        _train(TASKS[step], _write(cal, out / "configs" / f"calibrate-{step}.yaml"), args.device)
        rate = _rate(out / f"calibrate-{step}")
        cfg = _config(step, out, args)
        cfg["max_steps"] = max(args.calibrate, int(rate * seconds))
        cfg["preview"] = {"every": cfg["max_steps"], "n": 4}
        print(f"{step}: {rate:.2f} updates/s at batch {cfg['batch_size']} → max_steps {cfg['max_steps']} "
              f"for {seconds:.0f} s", flush=True)
        _write(cfg, final)
    _train(TASKS[step], final, args.device, timeout=seconds * 1.3 + 60)


def _export(*argv: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "export_mini.py"), *argv], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "mini-gpu", help="output folder (default out/mini-gpu)")
    ap.add_argument("--device", default="auto", help="torch device (auto, cuda, cpu)")
    ap.add_argument("--images", type=Path, default=ROOT / "data" / "photos" / "train-320",
                    help="training images, 320² (default data/photos/train-320 of scripts/get_photos.py)")
    ap.add_argument("--seconds", default="90,230,60",
                    help="training seconds of stage_a,codec,decoder (default 90,230,60)")
    ap.add_argument("--batch", default="64,64,32", help="batch sizes of stage_a,codec,decoder (default 64,64,32)")
    ap.add_argument("--lr", default="1e-3,8e-4,3e-4", help="peak learning rates (default 1e-3,8e-4,3e-4)")
    ap.add_argument("--warmup", default="200,500,100", help="warm-up updates (default 200,500,100)")
    ap.add_argument("--no-cache", dest="cache", action="store_false",
                    help="decode the images for every batch (in --workers processes) instead of once into memory "
                         "(data.cache; on the H200 machine, passing float batches between worker processes held a "
                         "codec update to 0.23 s with 12 workers)")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1),
                    help="data-loading processes with --no-cache (default min(12, CPUs))")
    ap.add_argument("--calibrate", type=int, default=48, help="updates of each calibration run (default 48)")
    ap.add_argument("--steps", default=",".join(STEPS), help="which steps to run (default all three, in order)")
    args = ap.parse_args(argv)
    for name, kind in (("seconds", float), ("batch", int), ("lr", float), ("warmup", int)):
        values = [kind(v) for v in getattr(args, name).split(",")]
        if len(values) != 3:
            ap.error(f"--{name} takes three comma-separated values (stage_a,codec,decoder)")
        setattr(args, name, dict(zip(STEPS, values)))
    out = args.out.resolve()
    args.images = args.images.resolve()
    started = time.perf_counter()
    for step in args.steps.split(","):
        if step not in STEPS:
            ap.error(f"--steps: unknown step {step!r}; choose from {', '.join(STEPS)}")
        t0 = time.perf_counter()
        run_step(step, args.seconds[step], out, args)
        if step == "stage_a":
            _export("stage-a", str(out / "stage_a"), str(out / "stage_a.safetensors"), "--images", str(args.images))
        elif step == "codec":
            _export("codec", str(out / "codec"), str(out / "stage_a.safetensors"), str(out / "pkg-base"))
        else:
            _export("codec", str(out / "pkg-base"), str(out / "decoder" / "checkpoint" / "model.safetensors"),
                    str(out / "pkg"))
        print(f"{step}: done in {time.perf_counter() - t0:.0f} s (total {time.perf_counter() - started:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
