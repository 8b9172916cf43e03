#!/usr/bin/env bash
# The sanitizer job: sparse_ops._C built with -fsanitize=address,undefined (SPARSE_OPS_SANITIZE=1,
# setup.py), then the C++ op tests and the bad-input suite run against that build, with libasan
# and libstdc++ preloaded into the (uninstrumented) Python (libstdc++ with it, or ASan aborts at
# the first C++ exception). Any report (heap overflow, use after free, UB) aborts the process, so
# the job fails. Not the Triton tests: they run no C++ of ours and the interpreter is slow.
# Usage: bash .ci/sanitize.sh [PYTHON]   (the same interpreter ./run set up: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
case $PY in /*) ;; */*) PY=$PWD/$PY ;; *) PY=$(command -v "$PY") ;; esac  # absolute: pytest runs elsewhere
OUT=build/sanitize
rm -rf "$OUT"
mkdir -p "$OUT/pkg"
cp sparse_ops/_build_info.py "$OUT/build_info.saved" 2>/dev/null || true
t=$SECONDS
SPARSE_OPS_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --build-lib "$OUT/lib" \
  --build-temp "$OUT/tmp" >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
[ -f "$OUT/build_info.saved" ] && cp "$OUT/build_info.saved" sparse_ops/_build_info.py  # the build rewrites it
echo "[sanitize] ASan+UBSan build in $((SECONDS - t)) s"
# The package as it is in the repo, with the instrumented extension in place of the normal one.
cp -r sparse_ops "$OUT/pkg/"
find "$OUT/pkg" -name "_C*.so" -delete
cp "$OUT"/lib/sparse_ops/_C*.so "$OUT/pkg/sparse_ops/"
ASAN_LIB=$(gcc -print-file-name=libasan.so)
CXX_LIB=$(gcc -print-file-name=libstdc++.so)
# pytest runs from inside the copy (python puts the working directory first on sys.path, so the
# instrumented sparse_ops is the one imported, not the repo's), with the repo's config and tests.
REPO=$PWD
workers=()  # two pytest workers (pytest-xdist), as ./run test uses, when it is installed
"$PY" -c 'import xdist' 2>/dev/null && workers=(-n 2)
t=$SECONDS
(cd "$OUT/pkg" && env LD_PRELOAD="$ASAN_LIB $CXX_LIB" \
    ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 SPARSE_OPS_EXPECT_SANITIZED=1 \
    "$PY" -m pytest -q -x -p no:cacheprovider "${workers[@]}" --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    "$REPO/tests/test_sanitized_build.py" "$REPO/tests/test_ffn_core.py" "$REPO/tests/test_heads.py" \
    "$REPO/tests/test_layers.py" "$REPO/tests/test_wrapper_inputs.py" "$REPO/tests/test_raw_backward.py" \
    "$REPO/tests/test_registry.py" -k "not triton")
echo "[sanitize] tests under ASan+UBSan in $((SECONDS - t)) s"
