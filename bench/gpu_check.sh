#!/usr/bin/env bash
# ./run gpu-check OUTDIR: the one-command check for a machine with a CUDA GPU (bench/README.md).
# Uses the machine's python3 (or PYTHON) with its CUDA torch and triton as they are: nothing is
# pip-installed (the GPU machine has no network) and no .venv is made. Steps, each under its own
# time limit (seconds; override with GPU_CHECK_<STEP>_S), and no step runs past GPU_CHECK_TOTAL_S
# (470 s) from the start, so the whole ends in under 8 minutes:
#   probe  (30)   a CUDA device, its capability, the CUDA toolkit; stops here, before building, without one
#   build  (180)  FORCE_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=<the GPU's capability> CFLAGS=-g0
#                 setup.py build_ext --inplace, then checks the CUDA kernels are in sparse_ops._C
#   tests  (150)  pytest tests/test_cuda.py, the Triton tests compiled for the GPU (no interpreter)
#                 and tests/test_layers.py's cuda/triton cases; junit XML; skipped if pytest is missing
#   bench  (120)  python -m bench --device cuda --quick (JSON and Markdown rows, written row by row)
# A step that times out is interrupted with SIGINT, so pytest still writes its XML and the bench
# keeps the rows it measured. Every step's log and summary.md (pass/fail, wall seconds, GPU name,
# torch/triton versions) go under OUTDIR; the exit status is 0 only when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-}
if [ -z "$OUTDIR" ]; then echo "usage: ./run gpu-check OUTDIR"; exit 2; fi
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null):$PATH"  # its ninja
export PATH PYTHONUNBUFFERED=1
unset TRITON_INTERPRET SPARSE_OPS_TRITON_INTERPRET  # compiled Triton kernels, not the interpreter
export SPARSE_OPS_TEST_DEVICE=cuda                  # the tests' tensors on the GPU
T0=$(date +%s.%N)
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}
STEPS=()
NOTES=""

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# run_step NAME LIMIT_S LOG CMD...: runs the program CMD under `timeout -s INT` (LIMIT_S, or less
# where less is left of TOTAL_S), output to OUTDIR/LOG; records the result.
run_step() {
  local name=$1 limit=$2 log=$3 left t rc result wall
  shift 3
  left=$((TOTAL_S - SECONDS - 15))  # 15 s kept for a step that must be killed, and the summary
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 5 ]; then
    STEPS+=("| $name | FAIL (no time left of ${TOTAL_S} s) | 0 | - | - |"); echo "[gpu-check] $name: no time left"; return 1
  fi
  echo "[gpu-check] $name (limit ${limit} s): $*"
  t=$(now)
  timeout -s INT -k 10 "$limit" "$@" >"$OUTDIR/$log" 2>&1
  rc=$?
  wall=$(secs "$t" "$(now)")
  case $rc in
    0) result=PASS ;;
    124|137) result="FAIL (timed out after ${limit} s)" ;;
    *) result="FAIL (exit $rc)" ;;
  esac
  STEPS+=("| $name | $result | $wall | $limit | $log |")
  echo "[gpu-check] $name: $result in $wall s (log: $OUTDIR/$log)"
  if [ $rc -ne 0 ]; then tail -n 15 "$OUTDIR/$log" | sed 's/^/    /'; fi
  return $rc
}

skip_step() {  # skip_step NAME WHY
  STEPS+=("| $1 | SKIPPED: $2 | 0 | - | - |")
  echo "[gpu-check] $1: SKIPPED: $2"
}

write_summary() {
  {
    echo "# gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "- GPU (nvidia-smi): ${GPU_SMI:-?}"
    echo "- torch ${TORCH:-?} (CUDA ${TORCH_CUDA:-?}), triton ${TRITON:-?}, python ${PYV:-?}, nvcc ${NVCC:-?}"
    echo "- device: ${NAME:-?}, capability ${ARCH:-?}; TORCH_CUDA_ARCH_LIST=${ARCH:-?}"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes, or no git)')"
    [ -n "${NOTES:-}" ] && echo "- notes: $NOTES"
    echo
    echo "| step | result | wall s | limit s | log |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${STEPS[@]}"
    echo
    echo "total: $(secs "$T0" "$(now)") s; $1"
  } >"$OUTDIR/summary.md"
}

# ---- probe: a CUDA device (fail fast, before building, without one)
probe=$(timeout -s INT 30 "$PY" - <<'EOF' 2>&1
import importlib.util, shlex, sys
out = {}
def emit(**kw):
    out.update({k: str(v).replace("\n", " ") for k, v in kw.items()})
try:
    import torch
except Exception as e:  # noqa: BLE001
    print("PROBE_FAIL=" + shlex.quote(f"python cannot import torch ({e})".replace("\n", " ")))
    sys.exit(0)
emit(TORCH=torch.__version__, TORCH_CUDA=str(torch.version.cuda), PYV=sys.version.split()[0])
try:
    import triton
    emit(TRITON=triton.__version__)
except Exception as e:  # noqa: BLE001
    emit(TRITON=f"none ({e})")
why = None
if torch.version.cuda is None:
    why = f"no CUDA device: torch {torch.__version__} is a CPU-only build"
elif not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    why = f"no CUDA device is visible (torch {torch.__version__}, CUDA {torch.version.cuda})"
else:
    major, minor = torch.cuda.get_device_capability(0)
    emit(ARCH=f"{major}.{minor}", NAME=torch.cuda.get_device_name(0))
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        why = "no CUDA toolkit found (nvcc / CUDA_HOME): the CUDA kernels cannot be built"
    emit(CUDA_HOME=str(CUDA_HOME))
missing = [m for m in ("pytest", "xdist") if importlib.util.find_spec(m) is None]
emit(MISSING=" ".join(missing))
for k, v in out.items():
    print(f"{k}={shlex.quote(v)}")
if why:
    print(f"PROBE_FAIL={shlex.quote(why)}")
EOF
)
eval "$(grep -E '^[A-Z_]+=' <<<"$probe")"
if [ -n "${PROBE_FAIL:-}" ] || [ -z "${ARCH:-}" ]; then
  echo "[gpu-check] ${PROBE_FAIL:-the device probe failed: $probe}"
  echo "[gpu-check] nothing was built or run: gpu-check needs a machine with a CUDA GPU and a CUDA build of torch."
  STEPS+=("| probe | FAIL: ${PROBE_FAIL:-probe failed} | $(secs "$T0" "$(now)") | 30 | - |")
  write_summary "FAIL: no CUDA device"
  exit 3
fi
GPU_SMI=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
NVCC=$("${CUDA_HOME}/bin/nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*' | head -1)
STEPS+=("| probe | PASS | $(secs "$T0" "$(now)") | 30 | - |")
echo "[gpu-check] $NAME (capability $ARCH; nvidia-smi: ${GPU_SMI:-n/a}), torch $TORCH, triton $TRITON, nvcc ${NVCC:-?}"
command -v ninja >/dev/null || NOTES+="ninja not found: the build compiles one file at a time. "
[[ " $MISSING " == *" xdist "* ]] && NOTES+="pytest-xdist not found: the tests run in one process. "
failed=0

# ---- build: the extension with the CUDA kernels, for this GPU
build_cmd() {  # a program for timeout: run as bash -c build_cmd
  FORCE_CUDA=1 MAX_JOBS=${GPU_CHECK_MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST="$ARCH" CFLAGS=-g0 \
    "$PY" setup.py build_ext --inplace || return
  "$PY" -c '
import json, sys, sparse_ops
from sparse_ops import backend
print(json.dumps(sparse_ops.info(), indent=1, default=str))
missing = [op for op in backend._REGISTERED_OPS if not backend.has_kernel(op, "CUDA")]
why = backend.BUILD.get("why_cuda")
sys.exit(f"sparse_ops._C has no CUDA kernel for {missing}: {why}" if missing else 0)'
}
export -f build_cmd
export PY ARCH
run_step build "${GPU_CHECK_BUILD_S:-180}" build.log bash -c build_cmd || failed=1

# ---- tests: CUDA kernels and the compiled Triton kernels on the GPU
if [[ " $MISSING " == *" pytest "* ]]; then
  skip_step tests "pytest is not installed on this machine (nothing is pip-installed here); build and bench still run"
  failed=1
else
  xdist=()
  if [[ " $MISSING " != *" xdist "* ]] && [ "${GPU_CHECK_TEST_WORKERS:-4}" != 0 ]; then
    xdist=(-n "${GPU_CHECK_TEST_WORKERS:-4}")  # Triton compiles on several cores at once
  fi
  run_step tests "${GPU_CHECK_TESTS_S:-150}" tests.log \
    "$PY" -m pytest tests/test_cuda.py tests/test_ffn_triton.py tests/test_heads_triton.py tests/test_layers.py \
    -k "cuda or triton" -rs -q --durations=10 -p no:cacheprovider "${xdist[@]}" --junitxml "$OUTDIR/tests.xml" \
    || failed=1
fi

# ---- bench: the suite on the GPU, quick rounds
run_step bench "${GPU_CHECK_BENCH_S:-120}" bench.log \
  "$PY" -m bench --device cuda --quick --json "$OUTDIR/bench.jsonl" --markdown "$OUTDIR/bench.md" || failed=1

if [ $failed = 0 ]; then verdict="PASS: every step passed"; else verdict="FAIL: see the steps above"; fi
write_summary "$verdict"
echo
cat "$OUTDIR/summary.md"
exit $failed
