#!/usr/bin/env bash
# Compile every CUDA kernel source (csrc/cuda/*.cu: plain CUDA, no torch headers) with nvcc
# for sm_80 and sm_90, with ptxas's resource report (-Xptxas -v). Fails, naming the file, if any
# does not compile or if any kernel spills registers (the report's per-kernel lines are printed:
# registers, shared memory, spill stores/loads). No GPU needed.
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0; failed=()
for f in csrc/cuda/*.cu; do
  [ -e "$f" ] || continue
  n=$((n + 1))
  if ! "$NVCC" -std=c++17 -O3 -c -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
       -Xptxas -v -Icsrc "$f" -o "$out/$(basename "$f").o" 2>"$out/err"; then
    echo "[check_cuda] FAILED: $f"; cat "$out/err"; failed+=("$f"); continue
  fi
  # ptxas prints, per kernel and arch: "Compiling entry function 'NAME' for 'sm_XX'", then
  # "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers, ...".
  awk -v f="$f" '/Compiling entry function/ { k = $0; sub(/.*function .\047?/, "", k); sub(/\047? for .*/, "", k);
                                              a = $NF; gsub(/\047/, "", a) }
                 /spill stores/ { sp = $0 } /Used [0-9]+ registers/ { printf "[check_cuda] %s %s %s: %s; %s\n", f, a, substr(k, 1, 60), $0, sp }' \
      "$out/err" | sed 's/ptxas info    : //g'
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$out/err" >/dev/null; then
    echo "[check_cuda] FAILED: $f spills registers:"; grep -B2 -E "[1-9][0-9]* bytes spill" "$out/err"; failed+=("$f")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[check_cuda] ${#failed[@]} of $n CUDA sources failed to compile: ${failed[*]}"; exit 1
fi
echo "[check_cuda] $n CUDA sources compiled for sm_80 and sm_90, no register spills, with $("$NVCC" --version | tail -1)"
