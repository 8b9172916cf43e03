#!/usr/bin/env bash
# Compile every CUDA kernel source (csrc/cuda/*.cu: plain CUDA, no torch headers) with nvcc
# for sm_80 and sm_90. Fails, naming the file, if any does not compile. No GPU needed.
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
       -Icsrc "$f" -o "$out/$(basename "$f").o" 2>"$out/err"; then
    echo "[check_cuda] FAILED: $f"; cat "$out/err"; failed+=("$f")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[check_cuda] ${#failed[@]} of $n CUDA sources failed to compile: ${failed[*]}"; exit 1
fi
echo "[check_cuda] $n CUDA sources compiled for sm_80 and sm_90 with $("$NVCC" --version | tail -1)"
