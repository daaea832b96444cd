#!/usr/bin/env bash
# The built-in mini codec on photographs no training run saw, against the bicubic thumbnail that holds as many
# values as its latent (and JPEG at the latent's byte budget): the figures of codec/mini/MODEL_CARD.md.
#   bash scripts/eval_mini.sh [OUT] [MODEL]   (default OUT: out/eval-mini, MODEL: mini, or a codec folder such as
#                                              out/mini-gpu/pkg before it is shipped; run again to resume)
# 1. heldout-256/: the 218 held-out 256² tiles (the 6 held-out photographs, each resized to 4 scales and tiled)
# 2. unseen.csv: the 6 held-out photographs whole + the 4 sample photos, centre squares at 256², 512² and 1024²
# Per-image numbers are in OUT/*/per_image.csv, the tables in OUT/*/table.md, pictures in OUT/*/grid.png.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/eval-mini}
model=${2:-mini}
[ -f data/photos/unseen.csv ] || python scripts/get_photos.py --crop-size 0 --scaled-tiles 320 256
lscpu | grep -E "Model name|Flags" | sed 's/^Flags:.*\(avx512_bf16\).*/Flags: … \1 …/' || true
codecs=(--codec sc --codec bicubic --codec jpeg-budget)
cascade bench recon data/photos/heldout-256 --model "$model" --size 256 --threads 2 "${codecs[@]}" \
    --grid-images 6 -o "$out/heldout-256" --no-progress
for size in 256 512 1024; do
    cascade bench recon data/photos/unseen.csv --model "$model" --size "$size" --threads 2 "${codecs[@]}" \
        --grid-images 10 -o "$out/unseen-$size" --no-progress
done
for f in "$out"/*/table.md; do echo "== $f"; grep -E "^\| (codec|sc|bicubic|jpeg)" "$f"; done
# per photograph (unseen, each size): the codec against the thumbnail and JPEG, and how many it beats the thumbnail on
python - "$out" <<'PY'
import csv, sys
from pathlib import Path
for folder in sorted(Path(sys.argv[1]).glob("unseen-*")):
    rows = list(csv.DictReader(open(folder / "per_image.csv")))
    by = {(r["image_id"], r["codec"]): r for r in rows}
    ids = list(dict.fromkeys(r["image_id"] for r in rows))
    print(f"\n== {folder.name}: per photograph, PSNR dB / SSIM\n| photo | mini | bicubic | jpeg-budget |\n|---|---|---|---|")
    wins = 0
    for i in ids:
        cell = {c: f"{float(by[i, c]['psnr']):.2f} / {float(by[i, c]['ssim']):.3f}" for c in ("sc", "bicubic", "jpeg-budget")}
        wins += all(float(by[i, "sc"][m]) >= float(by[i, "bicubic"][m]) for m in ("psnr", "ssim"))
        print(f"| {i} | {cell['sc']} | {cell['bicubic']} | {cell['jpeg-budget']} |")
    print(f"mini at least the thumbnail in both PSNR and SSIM on {wins} of {len(ids)} photographs")
PY
