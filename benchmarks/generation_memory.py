"""Peak memory of text-to-image with full-size models: staged loading vs everything resident.

Writes *random* full-size weights in the official layout (Stage C lite or large, Stage B
lite, Stage A, Previewer, a CLIP-G-sized text encoder) into a work folder once, then runs
``TextToImage.generate`` in a fresh process twice — with the default staging (load,
run, release each model in turn) and with ``keep_loaded=True`` (every model stays
resident) — and prints each run's peak RSS next to the size of the weights. The numbers
are about memory only: random weights make noise images. Run
``python -m benchmarks.generation_memory --help``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from codec.presets import create_model

from .rss import peak_rss_bytes

DEFAULT_WORK = Path(__file__).resolve().parent / "results" / "generation_memory_weights"


def _random_state(model: torch.nn.Module, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in model.state_dict().items():
        fan_in = t[0].numel() if t.ndim > 1 else t.numel()
        out[key] = (torch.randn(t.shape, generator=g) / max(1, fan_in) ** 0.5).to(dtype)
    return out


def write_weights(folder: Path, stage_c: str, dtype: torch.dtype) -> None:
    """Random full-size weights with official file names (skips files that exist)."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from codec import weights as W
    from codec.previewer import Previewer
    from codec.stage_a import StageA
    from codec.tiny import write_tiny_text_encoder

    folder.mkdir(parents=True, exist_ok=True)
    suffix = "bf16" if dtype == torch.bfloat16 else "fp32"
    jobs = [(W.STAGE_C_FILES[stage_c][suffix], lambda: create_model(f"stage_c_{stage_c}"), dtype),
            (W.STAGE_B_FILES["lite"][suffix], lambda: create_model("stage_b_lite"), dtype),
            (W.STAGE_A_FILE, StageA, torch.float32), (W.PREVIEWER_FILE, Previewer, torch.float32)]
    for i, (name, build, dt) in enumerate(jobs):
        if (folder / name).is_file():
            continue
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = build()
        save_file(_random_state(model, dt, i), str(folder / name),
                  metadata={W.META_NOTE: "RANDOM full-size weights for a memory benchmark - not a trained model"})
        print(f"wrote {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    marker = folder / "text_encoder" / "FULL_SIZE"
    if not marker.is_file():
        # CLIP-G text tower dimensions; the tokenizer is the tiny byte-level one (ids stay in range).
        write_tiny_text_encoder(folder)
        config = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                                num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                hidden_act="gelu")
        tok_ids = json.loads((folder / "tokenizer" / "vocab.json").read_text())
        config.bos_token_id, config.eos_token_id = tok_ids["<|startoftext|>"], tok_ids["<|endoftext|>"]
        with torch.device("meta"):
            skeleton = CLIPTextModelWithProjection(config)
        model = CLIPTextModelWithProjection(config)
        model.load_state_dict(_random_state(skeleton, torch.float32, 99))
        model.to(dtype).save_pretrained(str(folder / "text_encoder"))
        marker.write_text("random weights at CLIP-G size\n")
        print("wrote text_encoder/ (CLIP-G size)", flush=True)


def run_once(folder: str, keep_loaded: bool, size: int, dtype: str, stage_c: str) -> dict:
    """One generation in this process; returns peak RSS and time."""
    from codec.generation.pipeline import TextToImage

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    pipe = TextToImage.from_pretrained(folder, stage_c=stage_c, dtype=dtype, device="cpu", keep_loaded=keep_loaded)
    pipe.generate("a photo of a cat", height=size, width=size, steps_c=1, steps_b=1, seed=0)
    return {"keep_loaded": keep_loaded, "peak_rss_gb": peak_rss_bytes() / 2**30, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help=f"folder for the random full-size weights (kept between runs; default: {DEFAULT_WORK}; "
                        "~6 GB for stage_c lite in bf16)")
    p.add_argument("--stage-c", choices=["lite", "large"], default="lite", help="Stage C size (default: lite)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="precision of Stage C, Stage B and the text encoder (default: bf16)")
    p.add_argument("--size", type=int, default=512, help="output side in px (default: 512)")
    p.add_argument("--child", choices=["staged", "resident"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_once(str(args.work), args.child == "resident", args.size, args.dtype, args.stage_c)))
        return 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    write_weights(args.work, args.stage_c, dtype)
    from codec import weights as W

    other_c = W.STAGE_C_FILES["large" if args.stage_c == "lite" else "lite"].values()
    files = {f.relative_to(args.work).as_posix(): f.stat().st_size for f in args.work.rglob("*.safetensors")
             if f.name not in other_c}
    rows = []
    for mode in ("staged", "resident"):
        cmd = [sys.executable, "-m", "benchmarks.generation_memory", "--work", str(args.work), "--size",
               str(args.size), "--dtype", args.dtype, "--stage-c", args.stage_c, "--child", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append({"mode": mode, **json.loads(out)})
    print(f"weights ({args.dtype}): " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(files.items())))
    print(f"sum of weights: {sum(files.values()) / 1e9:.2f} GB; largest: {max(files.values()) / 1e9:.2f} GB")
    print(f"Stage C {args.stage_c}, {args.size}² output, 1 step per stage")
    print(f"{'mode':<10} {'peak RSS':>10} {'time':>8}")
    for r in rows:
        print(f"{r['mode']:<10} {r['peak_rss_gb']:>7.2f} GB {r['seconds']:>6.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
