"""bf16 against fp32 on this CPU: one full-size Stage B lite (or Stage C lite) denoiser evaluation, same random
weights, same inputs, as the codec runs it (fp32 inputs; a bf16 model computes under autocast).

Prints the CPU (model name, whether it has AVX512_BF16 / AMX-BF16, what ``dtype="auto"`` picks and why), the
relative L2 error ``||out_bf16 - out_fp32|| / ||out_fp32||``, the first call's time of each precision (oneDNN
creates its kernels for a shape on first use), the median warm time of each, and the speed-up fp32 / bf16.
Both models live in one process and their warm calls alternate, so machine noise hits both.

    python -m benchmarks.precision                       # Stage B lite, 512² output, 3 warm calls each
    python -m benchmarks.precision --task stage_c --size 512

Memory: Stage B lite holds ~2.8 GB in fp32 plus ~1.4 GB in bf16 (Stage C lite ~4.1 + 2.1 GB). Time on a 2-core
AVX512_BF16 machine: a few minutes at 512² (most of it building the weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from codec.presets import create_model

from .environment import cpu_info
from .speed import make_inputs, random_state_dict

CONDITIONS = {"stage_b": ("effnet", "clip"), "stage_c": ("clip_text", "clip_text_pooled", "clip_img")}


def build_pair(task: str, seed: int) -> dict[str, torch.nn.Module]:
    """The ``task``'s lite denoiser twice, with the same random weights (:func:`benchmarks.speed.random_state_dict`):
    in fp32, and those weights rounded to bf16."""
    with torch.device("meta"):
        shapes = create_model(f"{task}_lite")
    state = random_state_dict(shapes, seed, torch.float32)
    models = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with torch.device("meta"):
            model = create_model(f"{task}_lite")
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        models[name] = model.eval().requires_grad_(False)
    return models


def timed(model: Callable[..., torch.Tensor], *args: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Wall seconds and process CPU seconds (all threads) of one call ``model(*args)``, and its output."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = model(*args)
    return time.perf_counter() - t0, time.process_time() - c0, out


def measure(task: str = "stage_b", size: int = 512, repeats: int = 3, seed: int = 0,
            threads: int | None = None) -> dict[str, Any]:
    """Build both precisions of ``task``'s lite denoiser, call each once cold (fp32 first, so bf16's first call
    pays only for what is bf16's own: its oneDNN kernels), then ``repeats`` times warm (alternating); return the
    times (wall and process CPU), the relative L2 error of bf16 against fp32 and the speed-ups (of the median and
    fastest wall times, and of the median CPU times, which other load on the machine disturbs less)."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    models = build_pair(task, seed)
    build_s = time.perf_counter() - t0
    inp = make_inputs(task, size, 1, seed)
    args = [inp["x"], inp["r"], *(inp[c] for c in CONDITIONS[task])]
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    cpu_times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    first: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, model in models.items():
            first[name], _, outputs[name] = timed(model, *args)
        for _ in range(repeats):
            for name, model in models.items():
                wall, cpu, _ = timed(model, *args)
                times[name].append(wall)
                cpu_times[name].append(cpu)
    ref, out = outputs["fp32"], outputs["bf16"].float()
    warm = {name: statistics.median(ts) for name, ts in times.items()}
    fastest = {name: min(ts) for name, ts in times.items()}
    warm_cpu = {name: statistics.median(ts) for name, ts in cpu_times.items()}
    return {
        "task": task, "size": size, "seed": seed, "repeats": repeats, "threads": torch.get_num_threads(),
        "input_shape": list(inp["x"].shape), "build_s": build_s,
        "rel_l2_bf16_vs_fp32": ((out - ref).norm() / ref.norm()).item(),
        "first_call_s": first, "warm_s": warm, "warm_times_s": times,
        "warm_min_s": fastest, "speedup_fp32_over_bf16": warm["fp32"] / warm["bf16"],
        "speedup_of_fastest": fastest["fp32"] / fastest["bf16"],
        "warm_cpu_s": warm_cpu, "warm_cpu_times_s": cpu_times, "cpu_speedup": warm_cpu["fp32"] / warm_cpu["bf16"],
        "first_over_warm": {name: first[name] / warm[name] for name in first},
    }


def format_report(result: dict[str, Any], cpu: dict[str, Any]) -> str:
    """The figures of :func:`measure` with the CPU they ran on, as lines of text."""
    r = result
    flags = ", ".join(f"{name} {'yes' if cpu[key] else 'no'}" for name, key in
                      (("AVX512_BF16", "avx512_bf16"), ("AMX-BF16", "amx_bf16")))
    first, warm, fast, cpu_s = r["first_call_s"], r["warm_s"], r["warm_min_s"], r["warm_cpu_s"]
    latent = "×".join(map(str, r["input_shape"]))
    return "\n".join([
        (f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs, torch capability "
         f"{cpu['torch_cpu_capability']}); {flags}; {r['threads']} threads"),
        f"dtype=auto picks: {cpu['auto_precision']}",
        (f"{r['task']} lite, {r['size']}² output (latent {latent}), random weights seed {r['seed']} "
         f"(built in {r['build_s']:.0f} s), one denoiser evaluation:"),
        f"  rel L2 bf16 vs fp32: {r['rel_l2_bf16_vs_fp32']:.2e}",
        (f"  first call: fp32 {first['fp32']:.3f} s, bf16 {first['bf16']:.3f} s (first/warm: "
         f"fp32 {r['first_over_warm']['fp32']:.2f}×, bf16 {r['first_over_warm']['bf16']:.2f}×)"),
        (f"  warm (median of {r['repeats']}): fp32 {warm['fp32']:.3f} s, bf16 {warm['bf16']:.3f} s; "
         f"fp32/bf16 = {r['speedup_fp32_over_bf16']:.2f}×"),
        (f"  warm (fastest of {r['repeats']}, least disturbed by other load): fp32 {fast['fp32']:.3f} s, "
         f"bf16 {fast['bf16']:.3f} s; fp32/bf16 = {r['speedup_of_fastest']:.2f}×"),
        (f"  warm process CPU seconds (median): fp32 {cpu_s['fp32']:.3f} s, bf16 {cpu_s['bf16']:.3f} s; "
         f"fp32/bf16 = {r['cpu_speedup']:.2f}×"),
    ])


def main(argv: list[str] | None = None) -> int:
    """Command line: measure, print the report, optionally write the JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(CONDITIONS), default="stage_b", help="denoiser (default: stage_b)")
    p.add_argument("--size", type=int, default=512, help="output side in px, multiple of 32 (default: 512)")
    p.add_argument("--repeats", type=int, default=3, help="warm calls of each precision (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.size % 32 or args.size <= 0 or args.repeats < 1:
        p.error("--size must be a positive multiple of 32 and --repeats >= 1")
    cpu = cpu_info()
    result = measure(args.task, args.size, args.repeats, args.seed, args.threads)
    print(format_report(result, cpu))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"cpu": cpu, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
