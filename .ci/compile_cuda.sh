#!/usr/bin/env bash
# CUDA compile checks of csrc/ on a machine without a GPU (Debian 12, root, apt reachable):
#   1. the CMake project for sm_61 with Debian's nvcc 11.8 (non-free nvidia-cuda-toolkit) and g++-11;
#   2. the CMake project for sm_80 + sm_90 with nvcc 13 (/usr/local/cuda-13.0);
#   3. csrc/bindings.cpp against the installed torch's headers (g++ -fsyntax-only; CPU wheels work).
# Installs what is missing (about 1.6 GB of .debs, 1.5 min on the CI machine). One line per check; exits
# non-zero if any compile fails; a check whose compiler cannot be had at all is SKIPPED, loudly.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/rmt_fast_cuda.XXXXXX")
trap 'rm -rf "$work"' EXIT
failed=0

say() { echo "compile_cuda: $*"; }
pass() { say "PASS  $1 ($(( $(date +%s) - $2 )) s)"; }
fail() { say "FAIL  $1 -- last lines of $3:"; tail -n 40 "$3" | sed 's/^/    /'; failed=1; }
skip() {
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  echo "!!! compile_cuda: SKIPPED $1: $2"
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
}

# configure + build the CMake project; $1 label, $2 build dir, then cmake cache arguments
cmake_check() {
  local label=$1 dir=$2 t0 log
  shift 2
  t0=$(date +%s)
  log="$work/$(basename "$dir").log"
  if cmake -S "$repo" -B "$dir" -DRMT_FAST_PTXAS_VERBOSE=ON "$@" >"$log" 2>&1 &&
     cmake --build "$dir" -j "$(nproc)" >>"$log" 2>&1; then
    pass "$label" "$t0"
    grep -E "bytes spill stores" "$log" | grep -vq " 0 bytes spill stores" &&
      say "      note: some kernels spill registers (see RMT_FAST_PTXAS_VERBOSE output)"
  else
    fail "$label" "$t0" "$log"
  fi
}

# --- Debian's nvcc 11.8 (the last nvcc that targets sm_61 shipped by Debian 12) and g++-11 ----------------
debian_nvcc_ready() { [ -x /usr/bin/nvcc ] && /usr/bin/nvcc --list-gpu-code 2>/dev/null | grep -q sm_61 && command -v g++-11 >/dev/null; }

install_debian_nvcc() {
  [ "$(id -u)" = 0 ] || { echo "not root"; return 1; }
  command -v apt-get >/dev/null || { echo "no apt-get"; return 1; }
  if ! grep -rqsE '^(Components:.*|deb .*) non-free( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    local codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    cat >/etc/apt/sources.list.d/rmt-fast-nonfree.sources <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $codename $codename-updates
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  apt-get update -qq || return 1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit g++-11
}

t0=$(date +%s)
if debian_nvcc_ready; then
  say "found /usr/bin/nvcc ($(/usr/bin/nvcc --version | grep -o 'release [0-9.]*')) and g++-11"
else
  say "installing nvidia-cuda-toolkit (contrib non-free) and g++-11 with apt ..."
  if install_debian_nvcc >"$work/apt.log" 2>&1 && debian_nvcc_ready; then
    say "installed /usr/bin/nvcc ($(/usr/bin/nvcc --version | grep -o 'release [0-9.]*')) and g++-11 in $(( $(date +%s) - t0 )) s"
  else
    tail -n 15 "$work/apt.log" | sed 's/^/    /'
  fi
fi
if debian_nvcc_ready; then
  # /usr/local/bin may hold wrappers of a newer toolkit's ptxas/fatbinary that cannot target sm_61
  PATH="/usr/bin:$PATH" cmake_check "cmake sm_61 (Debian nvcc 11.8, g++-11)" "$work/build61" \
    -DCMAKE_CUDA_ARCHITECTURES=61 -DCMAKE_CUDA_COMPILER=/usr/bin/nvcc -DCMAKE_CUDA_HOST_COMPILER=g++-11
else
  skip "cmake sm_61" "no nvcc that targets sm_61 could be installed (apt unreachable or not root?)"
fi

# --- nvcc 13 for sm_80 / sm_90 -------------------------------------------------------------------------------
nvcc13=""
for cand in /usr/local/cuda-13.0/bin/nvcc /usr/local/cuda-13/bin/nvcc /usr/local/cuda/bin/nvcc; do
  if [ -x "$cand" ] && "$cand" --list-gpu-code 2>/dev/null | grep -q sm_90; then nvcc13=$cand; break; fi
done
if [ -n "$nvcc13" ]; then
  cmake_check "cmake sm_80;sm_90 ($("$nvcc13" --version | grep -o 'release [0-9.]*'))" "$work/build90" \
    "-DCMAKE_CUDA_ARCHITECTURES=80;90" "-DCMAKE_CUDA_COMPILER=$nvcc13"
else
  skip "cmake sm_80;sm_90" "no nvcc that targets sm_90 under /usr/local/cuda*"
fi

# --- csrc/bindings.cpp against torch's headers ---------------------------------------------------------------
t0=$(date +%s)
python=$(command -v python || command -v python3)
torch_inc=$("$python" - 2>/dev/null <<'EOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join(include_paths() + [sysconfig.get_paths()["include"]]))
EOF
)
cuda_inc=""
for cand in ${nvcc13:+"$(dirname "$(dirname "$nvcc13")")/include"} /usr/include; do
  if [ -f "$cand/cuda_runtime_api.h" ]; then cuda_inc=$cand; break; fi
done
if [ -z "$torch_inc" ]; then
  skip "bindings.cpp syntax check" "torch is not importable by $python"
elif [ -z "$cuda_inc" ]; then
  skip "bindings.cpp syntax check" "no CUDA runtime headers found"
else
  flags=()
  for d in $torch_inc "$cuda_inc"; do flags+=(-isystem "$d"); done
  # CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; it only matters for Windows DLL exports.
  if g++ -std=c++17 -fsyntax-only -Wall -Wextra -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H "${flags[@]}" -I"$repo/csrc" \
       "$repo/csrc/bindings.cpp" >"$work/bindings.log" 2>&1; then
    pass "bindings.cpp syntax check (torch $("$python" -c 'import torch; print(torch.__version__)'), $cuda_inc)" "$t0"
  else
    fail "bindings.cpp syntax check" "$t0" "$work/bindings.log"
  fi
fi

if [ "$failed" != 0 ]; then
  say "some CUDA compile checks FAILED"
  exit 1
fi
say "all CUDA compile checks done"
