#!/usr/bin/env bash
# The main job, end to end: encode the sample photos into a Zarr latent store (16×24×24 per
# image), show the store, decode two samples back to images.
#
# Weights: set CASCADE_WEIGHTS=DIR (a folder with the official stage_a.safetensors,
# effnet_encoder.safetensors, stage_b_lite[_bf16].safetensors) to use the real codec.
# Without it, TINY RANDOM (untrained) weights are written and used, so the pipeline runs
# on any machine — the decoded images are then noise, by design.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
OUT="${1:-out/quickstart}"
mkdir -p "$OUT"
WEIGHTS="${CASCADE_WEIGHTS:-}"
if [ -z "$WEIGHTS" ]; then
    WEIGHTS="$OUT/demo-weights"
    echo "[quickstart] CASCADE_WEIGHTS is not set: using TINY RANDOM weights (untrained; decoded images are noise)."
    echo "             For real results: CASCADE_WEIGHTS=/path/to/stable-cascade bash scripts/quickstart.sh"
    cascade demo-weights "$WEIGHTS"
fi
cascade info "$WEIGHTS"
cascade encode-dataset scripts/samples "$OUT/samples.zarr" --weights "$WEIGHTS"
cascade info "$OUT/samples.zarr"
cascade decode-dataset "$OUT/samples.zarr" "$OUT/decoded" --limit 2 --weights "$WEIGHTS"
echo "[quickstart] done: latent store $OUT/samples.zarr (format: datasets_tools/FORMAT.md), images in $OUT/decoded/"
