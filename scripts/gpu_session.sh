#!/usr/bin/env bash
# One GPU run: build the extension, run the test suite on the GPU, then the chosen benchmarks.
# usage: scripts/gpu_session.sh "<stages>"
#   stages: build|pipinstall smoke tests attention handoff e2e[:parts] train[:parts] lm
#   smoke: csrc/tests/kernel_smoke.cpp and row_mask_bounds.cu built with nvcc for this GPU and run (torch-free)
#   ATTENTION_ARGS: more arguments of benchmarks/attention.py, e.g. "--cache-sizes 0 128 512 --shapes 4x12x544x64"
#   lm: scripts/long_document_lm.py --out runs/lm $LM_ARGS with SmolLM2 joined by scripts/smollm2_carry.sh from
#       .device/smollm2-a and -b (carried by this call and an earlier one on the same machine); the variants
#       done so far stay in runs/lm, the files come back in $OUT/lm
# e.g. the training executors after changes to graphs.py / bptt.py, without building the extension:
#   RMT_FAST_NO_EXT=1 TESTS="python_tests/test_gpu_training.py python_tests/test_gpu.py" \
#     bash scripts/gpu_session.sh "tests train:curriculum"
# Results go to $OUT (CSV, PNG, logs) and benchmarks/RESULTS.md sections to $OUT/RESULTS_part.md.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
stages=${1:-"build tests attention handoff"}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1
case " $stages " in
  *" pipinstall "*) ;;  # use the installed package
  *) export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} ;;  # use the in-place build
esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for st in $stages; do
  t0=$(date +%s)
  case $st in
    build)
      # build in place so PYTHONPATH=$PWD picks up rmt_fast/_C*.so
      python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$? ($(( $(date +%s) - t0 )) s)"
      tail -3 "$OUT/build.log"
      python3 -c "import rmt_fast.ops.cuda as c; print('cuda ext available:', c.available())" ;;
    pipinstall)
      # the documented install: builds rmt_fast._C into site-packages
      python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; echo "pip install rc=$? ($(( $(date +%s) - t0 )) s)"
      (cd /tmp && python3 -c "import rmt_fast, rmt_fast.ops.cuda as c; print('installed', rmt_fast.__file__, 'cuda ext available:', c.available())") ;;
    smoke)
      arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
      nvcc -std=c++17 -O3 --use_fast_math -Icsrc -gencode "arch=compute_$arch,code=sm_$arch" \
        csrc/tests/kernel_smoke.cpp csrc/memory_attention.cu csrc/segment_handoff.cu -x cu -o "$OUT/kernel_smoke" \
        > "$OUT/smoke_build.log" 2>&1 || { echo "smoke build failed"; tail -5 "$OUT/smoke_build.log"; }
      [ -x "$OUT/kernel_smoke" ] && "$OUT/kernel_smoke"
      nvcc -std=c++17 -O2 -Icsrc csrc/tests/row_mask_bounds.cu -o "$OUT/row_mask_bounds" && "$OUT/row_mask_bounds"
      rm -f "$OUT/kernel_smoke" "$OUT/row_mask_bounds" ;;
    tests)
      python3 -P -m pytest ${TESTS:-python_tests} -q -p no:cacheprovider --timeout=300 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    attention)
      python3 benchmarks/attention.py --out "$OUT" --append-results "$OUT/RESULTS_part.md" ${ATTENTION_ARGS:-} 2>&1 \
        | tail -40 ;;
    handoff)
      python3 benchmarks/handoff.py --out "$OUT" --append-results "$OUT/RESULTS_part.md" 2>&1 | tail -20 ;;
    e2e*)
      parts=${st#e2e}; parts=${parts#:}
      python3 benchmarks/e2e.py ${parts:+--parts $parts} --out "$OUT" --append-results "$OUT/RESULTS_part.md" 2>&1 | tail -40 ;;
    lm)
      if env_lines=$(bash scripts/smollm2_carry.sh gather .device runs/smollm2); then
        eval "$env_lines"
        python3 scripts/long_document_lm.py --out runs/lm ${LM_ARGS:-} 2>&1 | tee "$OUT/lm.log" | grep -v "it/s]" | tail -30
        mkdir -p "$OUT/lm" && cp runs/lm/summary.json runs/lm/ppl_by_position.* "$OUT/lm/" 2>/dev/null
        tar -C runs/lm -cf "$OUT/lm/variants.tar" variants
      fi ;;
    train*)
      parts=${st#train}; parts=${parts#:}
      python3 benchmarks/train.py ${parts:+--parts $parts} --out "$OUT" 2>&1 | tee "$OUT/train.log" | tail -30 ;;
  esac
  echo "== stage $st took $(( $(date +%s) - t0 )) s"
done
