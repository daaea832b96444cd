"""How much storing latents as float16 or int8 changes them, next to how much the encoder's output moves anyway.

``python -m benchmarks.latent_precision [--photos DIR ...] [--size 192] [--model mini]``

For every photo (default: ``scripts/samples/*.jpg``; add folders with ``--photos``), the image is
preprocessed as ``encode-dataset`` does (short side → size, centre crop, bilinear antialiased) and
encoded in fp32: the reference latent z. Compared with z, all in units of z's standard deviation:

* ``float16``: z rounded to float16 (what a default store holds);
* ``int8``: z quantised and dequantised with the map an ``--dtype int8`` store gets
  (:mod:`datasets_tools.quantize`, the same code the writer and ``LatentDataset`` use);
* ``1-pixel shift``: the latent of the same input shifted right by one pixel (first column repeated);
* ``bicubic resize``: the latent of the image resized with antialiased bicubic instead of bilinear.

The last two are how far the encoder's own output moves under changes nobody would call a different
image; storage error well below them is invisible to anything trained on the latents. Prints a table
(CPU line first) and bytes per sample for each storage dtype. Timings are not measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from benchmarks.environment import ROOT, cpu_info
from datasets_tools.quantize import ChannelQuantization
from datasets_tools.store import LATENT_CHANNELS

EXTENSIONS = (".jpg", ".jpeg", ".png")
SHARD_INDEX_BYTES = 16  # per sample: its (offset, length) entry in the shard index (FORMAT.md, sharding)


def photos(folders: list[Path]) -> list[Path]:
    """Image files of ``folders``, sorted per folder."""
    return [p for d in folders for p in sorted(d.iterdir()) if p.suffix.lower() in EXTENSIONS]


def resized(x: torch.Tensor, size: int, kernel: TF.InterpolationMode) -> torch.Tensor:
    """Short side → ``size`` with ``kernel`` (antialiased), then the centre ``size``² crop, as ``encode-dataset``."""
    return TF.center_crop(TF.resize(x, [size], interpolation=kernel, antialias=True).clamp(0, 1), [size, size])


def shifted(x: torch.Tensor) -> torch.Tensor:
    """``x`` moved one pixel to the right, its first column repeated."""
    return torch.cat([x[..., :1], x[..., :-1]], dim=-1)


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """RMS and max |difference| in units of the reference's standard deviation, and the SNR in dB."""
    d, sd = (other - reference).double(), reference.double().std().item()
    rms = d.pow(2).mean().sqrt().item()
    return {"rms": rms / sd, "max": d.abs().max().item() / sd, "snr_db": 20 * np.log10(sd / rms) if rms else np.inf}


@torch.no_grad()
def measure(paths: list[Path], size: int, model: str, batch: int = 16) -> dict[str, object]:
    """The latents of ``paths`` and their variants (see module doc) compared with the fp32 reference."""
    from codec.codec import Codec
    from codec.images import load_image, pil_to_tensor
    from datasets_tools.preprocess import preprocess

    effnet = Codec.from_pretrained(model).effnet.eval()
    images = [pil_to_tensor(load_image(p.read_bytes())) for p in paths]
    bilinear = torch.stack([preprocess(x, "center", size).pixels for x in images])
    bicubic = torch.stack([resized(x, size, TF.InterpolationMode.BICUBIC) for x in images])

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([effnet.encode(x[i:i + batch]).float() for i in range(0, len(x), batch)])

    z = encode(bilinear)
    q = ChannelQuantization.symmetric(LATENT_CHANNELS)
    variants = {
        "float16": z.half().float(),
        "int8": torch.from_numpy(q.dequantize(q.quantize(z.numpy()))),
        "1-pixel shift (encoder)": encode(shifted(bilinear)),
        "bicubic resize (encoder)": encode(bicubic),
    }
    return {"n": len(paths), "latent_shape": tuple(z.shape[1:]), "max_abs_z": (z.abs().max() / z.std()).item(),
            "clamped": q.clamped(z.numpy()), "values": z.numel(),
            "rows": {name: compare(z, v) for name, v in variants.items()}}


def bytes_per_sample(latent_hw: tuple[int, int]) -> dict[str, int]:
    """Bytes one sample's latent takes in a store, per dtype (values + its shard-index entry)."""
    n = LATENT_CHANNELS * latent_hw[0] * latent_hw[1]
    return {dtype: n * size + SHARD_INDEX_BYTES for dtype, size in (("float32", 4), ("float16", 2), ("int8", 1))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=Path, action="append", default=[],
                    help="Folder of photos to add (e.g. data/photos/heldout-256); scripts/samples is always used.")
    ap.add_argument("--size", type=int, default=192, help="Encoder input size (default 192: the mini model's).")
    ap.add_argument("--model", default="mini", help="Weights with the EfficientNet encoder (default: mini).")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    paths = photos([ROOT / "scripts" / "samples", *args.photos])
    r = measure(paths, args.size, args.model)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs); torch {torch.__version__}")
    print(f"{r['n']} photos, {args.model} encoder at {args.size}² → latents {'×'.join(map(str, r['latent_shape']))}, "
          f"{r['values']} values; max |z|/σ = {r['max_abs_z']:.2f}; int8 clamped {r['clamped']} values")
    print(f"{'latent compared with fp32':<28} {'RMS Δ/σ':>10} {'max |Δ|/σ':>10} {'SNR dB':>8}")
    for name, m in r["rows"].items():
        print(f"{name:<28} {m['rms']:>10.2e} {m['max']:>10.2e} {m['snr_db']:>8.1f}")
    h, w = r["latent_shape"][1:]
    here, full = bytes_per_sample((h, w)), bytes_per_sample((24, 24))
    print(f"{'bytes per sample':<28} {f'{h}×{w}':>10} {'24×24 (768²)':>14}")
    for dtype in here:
        print(f"{dtype:<28} {here[dtype]:>10,} {full[dtype]:>14,}")


if __name__ == "__main__":
    main()
