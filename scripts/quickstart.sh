#!/usr/bin/env bash
# The main job, end to end: encode the sample photos into a Zarr latent store, show the store,
# decode two samples back to images.
#
# Weights: by default the built-in `mini` codec that ships inside the package (trained from scratch
# by this project on freely licensed photos, 256² native: 16×6×6 latents; works offline, far below
# Stable Cascade's quality). Set CASCADE_WEIGHTS=DIR (a folder with the official stage_a.safetensors,
# effnet_encoder.safetensors, stage_b_lite[_bf16].safetensors) to use Stable Cascade itself
# (768² encoder input → 16×24×24 latents, decoded at 1024²).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
OUT="${1:-out/quickstart}"
mkdir -p "$OUT"
WEIGHTS="${CASCADE_WEIGHTS:-mini}"
if [ "$WEIGHTS" = "mini" ]; then
    echo "[quickstart] CASCADE_WEIGHTS is not set: using the built-in mini codec (not Stable Cascade)."
    echo "             For Stable Cascade: CASCADE_WEIGHTS=/path/to/stable-cascade bash scripts/quickstart.sh"
fi
cascade info "$WEIGHTS"
cascade encode-dataset scripts/samples "$OUT/samples.zarr" --weights "$WEIGHTS"
cascade info "$OUT/samples.zarr"
cascade decode-dataset "$OUT/samples.zarr" "$OUT/decoded" --limit 2 --weights "$WEIGHTS"
echo "[quickstart] done: latent store $OUT/samples.zarr (format: datasets_tools/FORMAT.md), images in $OUT/decoded/"
if [ "$WEIGHTS" = "mini" ]; then
    # side by side at the mini codec's native 256²: each photo, its reconstruction, and the bicubic thumbnail that
    # holds as many values as the 16×6×6 latent (PSNR/SSIM per photo in compare/per_image.csv)
    cascade bench recon scripts/samples --model mini --size 256 --codec sc --codec bicubic --grid-images 4 \
        -o "$OUT/compare" --no-progress > /dev/null
    grep -E "^\| (codec|sc|bicubic) " "$OUT/compare/table.md"
    echo "[quickstart] side by side (original | mini codec | bicubic thumbnail): $OUT/compare/grid.png"
fi
