#!/usr/bin/env bash
# One piece of a long reproduction run on a machine lent for a limited time (scripts/reproduce_h200.py), to be
# called again until the task is done. Each call resumes the task, trains until --pause-after (a stage that would
# not end in time is not started), and when the curriculum is done evaluates it; it leaves:
#   RUN_DIR/<task>/               the run (resumed from here when it still exists: exact, AdamW state included)
#   PACK_DIR/<task>.tar.partNN    the transfer copy (bf16 model, training state, no AdamW state) in parts < 16 MiB,
#                                 for a fresh machine: unpack with `cat PACK_DIR/<task>.tar.part* | tar -x -C DIR`
#                                 and pass DIR as TRANSFER_IN
#   PACK_DIR/<task>_files.tar     curves, history, results (when evaluated): what to keep from the call
#
# usage: scripts/reproduce_resumable.sh TASK RUN_DIR PACK_DIR [TRANSFER_IN|-] [options of reproduce_h200.py]
#   TRANSFER_IN: a folder holding <task>/ (an unpacked transfer copy), used when RUN_DIR/<task> has no
#   checkpoint-last (when it has neither, the call stops with status 2); "-": a new run unless RUN_DIR/<task> has
#   a checkpoint-last.
set -euo pipefail
if [[ $# -lt 4 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
TASK=$1 RUN_DIR=$2 PACK_DIR=$3 TRANSFER_IN=$4; shift 4
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
mkdir -p "$RUN_DIR" "$PACK_DIR"
resume=()
if [[ -f "$RUN_DIR/$TASK/checkpoint-last/state.json" ]]; then
  echo "=== $TASK: resuming from $RUN_DIR/$TASK/checkpoint-last"
  resume=(--resume)
elif [[ "$TRANSFER_IN" != "-" && -d "$TRANSFER_IN/$TASK" ]]; then
  echo "=== $TASK: resuming from the transfer copy $TRANSFER_IN/$TASK"
  resume=(--resume-from "$TRANSFER_IN")
elif [[ "$TRANSFER_IN" != "-" ]]; then
  echo "=== $TASK: nothing to resume (no $RUN_DIR/$TASK/checkpoint-last, no $TRANSFER_IN/$TASK)" >&2
  exit 2
else
  echo "=== $TASK: a new run"
fi
set +e
"$PY" "$HERE/reproduce_h200.py" --out "$RUN_DIR" --tasks "$TASK" --transfer-out "$RUN_DIR/transfer" \
  "${resume[@]}" "$@" 2>&1 | tee "$RUN_DIR/$TASK.log"
rc=${PIPESTATUS[0]}
set -e
rm -f "$PACK_DIR/$TASK".tar.part*
if [[ -d "$RUN_DIR/transfer/$TASK" ]]; then
  tar -C "$RUN_DIR/transfer" -cf - "$TASK" | split -b 15m -d - "$PACK_DIR/$TASK.tar.part"
fi
files=()
for f in "$TASK.log" "$TASK/curves.png" "$TASK/train_summary.json" "$TASK/results.json" "$TASK/results.csv" \
         "$TASK/accuracy.png" "$TASK/heatmap.png" "$TASK/heatmap.csv" "$TASK/checkpoint-last/state.json"; do
  [[ -f "$RUN_DIR/$f" ]] && files+=("$f")
done
tar -C "$RUN_DIR" -cf "$PACK_DIR/${TASK}_files.tar" "${files[@]}"
ls -la "$PACK_DIR"
exit "$rc"
