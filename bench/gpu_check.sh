#!/usr/bin/env bash
# One command for a GPU machine that reaches no package registry (under 8 minutes on one GPU):
#   bench/gpu_check.sh [WHEELS_DIR] [OUT_DIR]
# 1. installs onnxruntime-gpu, tensorrt-rtx and nvidia-ml-py from the wheels carried in WHEELS_DIR
#    (default: ./wheels; pip --no-index, nothing is downloaded) and dfq-deploy itself from this tree;
# 2. runs the GPU tests (pytest -m gpu);
# 3. builds and profiles ResNet-18 on every GPU path present (bench/gpu_paths.py): TensorRT-RTX (tried
#    even where the GPU's compute capability is outside its support matrix, and what happens is
#    recorded), onnxruntime's CUDA execution provider, synthesis with --synth-device cuda;
# 4. writes one JSON summary, OUT_DIR/gpu_check.json (default OUT_DIR: $OUT, else ./gpu-check).
# torch (with CUDA) must already be installed; every step records its status instead of stopping the run.
# The onnxruntime CUDA path times through IOBinding (device-resident inputs, H2D/D2H apart); its GPU
# test is in tests/test_onnxruntime_runner.py. GPU_CHECK_DRY_RUN=1 logs each step's command without
# running it (rc -1) and still writes the summary: the script checked end to end on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
OUT_DIR=${2:-${OUT:-gpu-check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, append its output to the log, record rc and seconds
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name: $*" >> "$LOG"
    local rc=-1
    if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
        timeout "$limit" "$@" >> "$LOG" 2>&1
        rc=$?
    fi
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$OUT_DIR/steps.jsonl"
    return 0
}
: > "$OUT_DIR/steps.jsonl"

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader \
    > "$OUT_DIR/gpu.csv" 2>> "$LOG" || echo "nvidia-smi failed" >> "$LOG"
if [ -d "$WHEELS" ]; then
    step install_wheels 90 "$PY" -m pip install --no-index --find-links "$WHEELS" \
        onnxruntime-gpu tensorrt-rtx nvidia-ml-py
else
    echo "no wheels folder $WHEELS: using what is installed" >> "$LOG"
fi
step install_dfq_deploy 45 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
step pytest_gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT_DIR/pytest-gpu.xml" tests
step gpu_paths 170 "$PY" bench/gpu_paths.py --out "$OUT_DIR"
"$PY" bench/gpu_paths.py --summarize "$OUT_DIR" > "$OUT_DIR/gpu_check.json"
cat "$OUT_DIR/gpu_check.json"
