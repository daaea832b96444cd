#!/usr/bin/env bash
# Every GPU figure of the GPU-path work in one run, on a machine with a CUDA GPU (about 8 minutes on an H200):
#   bash scripts/gpu_figures.sh [OUT]        (default OUT: out/gpu: machine.txt, log.txt and each benchmark's JSON)
# 1. the tests marked `cuda` (device placement, CPU-vs-GPU agreement of the codec and the dataset encoder);
# 2. encode-dataset on 1024-px JPEGs encoded at 768²: the pipeline against the bare encoder (goal ≥ 500 images/s);
# 3. training samples/s: the built-in codec's recipe at batch 256 (goal ≥ 2,000) and LoRA on Stage C lite;
# 4. per-module speed and the whole decode against diffusers' StableCascadeDecoderPipeline (goal ≥ 1.3× in bf16).
# The codec recipe reads IMAGES (default data/photos/train-320: `python scripts/get_photos.py --crop-size 0
# --scaled-tiles 320 256`). QUICK=1 runs every step at toy sizes on any device (DEVICE, default cuda) to check the
# script itself, e.g. `QUICK=1 DEVICE=cpu bash scripts/gpu_figures.sh out/gpu-check` (the figures mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
device=${DEVICE:-cuda}
images=${IMAGES:-data/photos/train-320}
mkdir -p "$out"
status=0
step() {  # step NAME COMMAND...: run it, keep its whole output in log.txt, show the end of it
    local name=$1; shift
    echo "== $name: $*" | tee -a "$out/log.txt"
    local t0=$SECONDS
    "$@" > "$out/step.txt" 2>&1
    local rc=$?
    cat "$out/step.txt" >> "$out/log.txt"
    tail -n 25 "$out/step.txt"
    echo "-- $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/log.txt"
    [ "$rc" -eq 0 ] || status=$rc
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    echo "CPUs: $(nproc)"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$out/machine.txt"
if [ "${QUICK:-0}" = 1 ]; then
    step "tests marked cuda" env CASCADE_TEST_DEVICE="$device" python -m pytest -q -m cuda -p no:randomly tests/test_cuda.py
    step "encode-dataset" python -m benchmarks.dataset --device "$device" --images scripts/samples --n 4 \
        --batch-size 2 --workers 0 --read-samples 100 --read-passes 1 -o "$out/dataset.json"
    step "training" python -m benchmarks.train_speed --device "$device" --images "$images" --steps 2 --warmup 1 \
        --codec-batch 2 --lora-batch 2 --preset tiny --workers 0 -o "$out/train_speed.json"
    step "speed" python -m benchmarks.speed --device "$device" --tasks decode --decode-size 256 --repeats 1 \
        -o "$out/speed.json"
else
    step "tests marked cuda" python -m pytest -q -m cuda -p no:randomly tests/test_cuda.py
    step "encode-dataset" python -m benchmarks.dataset --device "$device" --n 512 --batch-size 64 --workers 14 \
        --threads 16 --read-samples 2000 -o "$out/dataset.json"
    step "training" python -m benchmarks.train_speed --device "$device" --images "$images" -o "$out/train_speed.json"
    step "speed" python -m benchmarks.speed --device "$device" --tasks effnet,stage_a,stage_b,decode --bf16 \
        --repeats 3 --threads 16 -o "$out/speed.json"
fi
rm -f "$out/step.txt"
echo "all steps done (exit $status); outputs in $out"
exit "$status"
