#!/usr/bin/env bash
# The GPU checks of the training executors, for the first call on a GPU machine after changes to graphs.py, bptt.py
# or recurrence.py: the GPU test files (CUDA graphs of both schedules, the capture cache, the eager fallbacks), then
# the curriculum part of benchmarks/train.py (a curriculum stage's mixed lengths under each executor).
# The CUDA extension is not built (RMT_FAST_NO_EXT=1: its own tests skip; the Triton and reference paths run).
#
# usage: scripts/gpu_check.sh OUT_DIR [--no-bench]
#   OUT_DIR/gpu_tests.txt, OUT_DIR/curriculum.txt, OUT_DIR/train.csv, OUT_DIR/train.png
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--no-bench]}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RMT_FAST_NO_EXT=1 HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
python3 -m pytest python_tests/test_gpu_training.py python_tests/test_gpu.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu_tests.txt" | tail -25
rc=${PIPESTATUS[0]}
if [[ "${2:-}" != "--no-bench" ]]; then
  python3 benchmarks/train.py --parts curriculum --out "$OUT" 2>&1 | tee "$OUT/curriculum.txt" | grep -v '^|' | tail -12
fi
exit "$rc"
