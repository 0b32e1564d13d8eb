#!/usr/bin/env bash
# One pass over the library on a GPU: the float64 reference tests, then the
# benchmarks, in a fixed time budget.
#
# Usage, from the repository root of a checkout, on a machine with an NVIDIA
# GPU and a CUDA build of jax (pip install -U "jax[cuda13]", or "jax[cuda12]"):
#
#     bash benchmarks/gpu_check.sh
#
# Sections, in order, each under its own time limit, each run even if an
# earlier one failed:
#   tests              the float64 reference-equivalence and Theorem 6 tests
#                      (tests/test_reference_equivalence.py, tests/test_theorem6.py,
#                      and the reference tests of tests/test_large_steps.py)
#   step_time          benchmarks/step_time.py: DIGITS MLP and residual CNN,
#                      every optimizer of its default list
#   step_time_resnet18 benchmarks/step_time.py --models resnet18 (width 64,
#                      batch 128, 32x32x3), a few optimizers
#   batch_scaling      benchmarks/batch_scaling.py, batches 64 to 1024
#   resnet18_throughput benchmarks/resnet18_throughput.py: 300 training steps
#                      of ResNet18 with gr-kfac, optax.sgd and optax.adam
# The whole run stays within GPU_CHECK_BUDGET_S seconds (default 450): each
# section's limit is what is left of the budget less the shares kept for the
# sections after it, so a section that ends early leaves its time to the next.
# A summary of pass/fail per section ends the run; the exit status is 0 when
# every section passed.
#
# Output, in the folder named by OUT (default runs/gpu_check), at most seven
# files: gpu_check.log (everything printed), tests.xml (JUnit), the JSON
# records of the four benchmarks and summary.json.
#
# Environment:
#   PYTHON                Python interpreter (default python3)
#   OUT                   output folder (default runs/gpu_check)
#   GPU_CHECK_BUDGET_S    time budget of the whole run in seconds (default 450;
#                         1200 with GPU_CHECK_QUICK=1, for a CPU)
#   GPU_CHECK_QUICK=1     every section shrunk (two tests, one round, a narrow
#                         ResNet18, 5 throughput steps): checks that the script runs
#   GPU_CHECK_ALLOW_CPU=1 run on the CPU when jax sees no GPU (with QUICK, to
#                         try the script on a machine without one)
#   GPU_CHECK_RESNET18_OPTIMIZERS  optimizers of step_time_resnet18
#                         (default sgd,adam,fne-sgd,gr-kfac)

set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
OUT_DIR=${OUT:-runs/gpu_check}
QUICK=${GPU_CHECK_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-1200}
else
  BUDGET=${GPU_CHECK_BUDGET_S:-450}
fi
RESNET18_OPTIMIZERS=${GPU_CHECK_RESNET18_OPTIMIZERS:-sgd,adam,fne-sgd,gr-kfac}
export PYTHONUNBUFFERED=1

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

finish() {  # closes the log (tee reads to its end) and exits with $1
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}

START=$SECONDS
stamp() { echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ) +$((SECONDS - START))s] $*"; }

stamp "gpu_check in $ROOT, output in $OUT_DIR, budget ${BUDGET}s, quick=$QUICK"

# --- setup: make this checkout importable, say what the machine has ---------

importable() {  # dgnopt_jax imports, from this checkout, outside the repository root
  (cd / && "$PY" -c 'import os, sys, dgnopt_jax
here = os.path.realpath(dgnopt_jax.__file__)
sys.exit(0 if here.startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)' \
    "$ROOT") > /dev/null 2>&1
}
if importable; then
  echo "dgnopt_jax: importable from this checkout"
elif PIP_LOG=$(timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index \
                 -e "$ROOT" 2>&1) && importable; then
  echo "dgnopt_jax: installed from this checkout (pip install -e, no network, no dependencies)"
else
  echo "$PIP_LOG" | grep -i "error" | tail -n 3
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  echo "dgnopt_jax: pip could not install this checkout offline; PYTHONPATH=$PYTHONPATH"
fi

if command -v nvidia-smi > /dev/null 2>&1; then
  timeout 30 nvidia-smi -L
else
  echo "nvidia-smi: not found"
fi

"$PY" - <<'EOF'
import importlib
import platform
import sys

print(f"python {platform.python_version()} ({sys.executable})")
for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
  try:
    print(f"{name} {importlib.import_module(name).__version__}")
  except Exception as e:  # noqa: BLE001 - a missing package is reported, not fatal here
    print(f"{name}: not importable ({e})")
EOF

# The last line printed is "gpu" when jax has a GPU device, "cpu" otherwise.
BACKEND=$("$PY" -c 'import jax
print("devices:", jax.devices(), "default backend:", jax.default_backend())
print("default matmul precision:",
      getattr(jax.config, "jax_default_matmul_precision", "unknown"), flush=True)
try:
  print("gpu" if jax.devices("gpu") else "cpu")
except Exception:
  print("cpu")' 2>&1 | tee /dev/stderr | tail -n 1)
if [ "$BACKEND" = gpu ]; then
  DEVICE=gpu
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  DEVICE=cpu
  echo "no GPU seen by jax: GPU_CHECK_ALLOW_CPU=1, running on the CPU"
else
  echo
  echo "ERROR: jax sees no GPU device (jax.devices('gpu') failed or jax did not import)."
  echo "Install a CUDA build of jax (needs network), e.g.:"
  echo "    $PY -m pip install -U \"jax[cuda13]\"    # or \"jax[cuda12]\" for CUDA 12 drivers"
  echo "then check with: $PY -c 'import jax; print(jax.devices())'"
  echo "(GPU_CHECK_ALLOW_CPU=1 runs the sections on the CPU instead.)"
  finish 2
fi

# --- the sections --------------------------------------------------------

if [ "$QUICK" = 1 ]; then
  TEST_ARGS=("tests/test_theorem6.py::test_olne_adam_is_optax_adam"
             "tests/test_reference_equivalence.py::test_tanh_mlp[identity-0.3-outer-1]")
  STEP_TIME_ARGS=(--models mlp,resnet --optimizers sgd,adam,fne-sgd,gr-kfac
                  --rounds 1 --steps 2 --trained-steps 2)
  RESNET18_ARGS=(--resnet18-width 8 --batch 8 --optimizers sgd,gr-kfac
                 --rounds 1 --steps 2 --trained-steps 1)
  BATCH_ARGS=(--batches 16,32 --rounds 1 --repeats 2 --trained-steps 1)
  THROUGHPUT_ARGS=(--steps 5 --width 8 --batch 8 --optimizers gr-kfac,sgd,adam)
else
  # The reference-equivalence and Theorem 6 tests of the default (not slow)
  # run; the "reference" tests of other modules are left out for time.
  TEST_ARGS=(-k "reference or theorem6" tests/test_reference_equivalence.py
             tests/test_theorem6.py tests/test_large_steps.py)
  STEP_TIME_ARGS=(--models mlp,resnet --rounds 5 --steps 10)
  RESNET18_ARGS=(--resnet18-width 64 --batch 128 --optimizers "$RESNET18_OPTIMIZERS"
                 --rounds 3 --steps 10)
  BATCH_ARGS=(--batches 64,128,256,512,1024 --rounds 5 --repeats 10)
  THROUGHPUT_ARGS=(--steps 300 --width 64 --batch 128 --optimizers gr-kfac,sgd,adam)
fi

# Each section's share of the budget (seconds; set for 450 s, 15 s of them for
# the setup), scaled to the budget given.
NAMES=(tests step_time step_time_resnet18 batch_scaling resnet18_throughput)
SHARES=(105 110 80 45 95)
SHARE_SUM=0
for s in "${SHARES[@]}"; do SHARE_SUM=$((SHARE_SUM + s)); done
for i in "${!SHARES[@]}"; do SHARES[i]=$((SHARES[i] * (BUDGET - 15) / SHARE_SUM)); done

STATUS=()
SECS=()
write_summary() {  # summary.json, rewritten after every section
  "$PY" - "$OUT_DIR/summary.json" "$DEVICE" "$QUICK" "$((SECONDS - START))" \
      "${NAMES[*]}" "${STATUS[*]:-}" "${SECS[*]:-}" <<'EOF'
import json
import sys

path, device, quick, elapsed, names, status, secs = sys.argv[1:]
status, secs = status.split(), secs.split()
sections = [{"section": n, "status": s, "seconds": int(t)}
            for n, s, t in zip(names.split(), status, secs)]
with open(path, "w") as f:
  json.dump({"device": device, "quick": quick == "1", "elapsed_s": int(elapsed),
             "sections": sections}, f, indent=1)
EOF
}

run_section() {  # index, then the command
  local i=$1
  shift
  local name=${NAMES[$i]} later=0 j
  for ((j = i + 1; j < ${#NAMES[@]}; j++)); do later=$((later + SHARES[j])); done
  local limit=$((BUDGET - (SECONDS - START) - later))
  echo
  stamp "=== $name: start (limit ${limit}s)"
  echo "+ $*"
  local t0=$SECONDS rc
  if [ "$limit" -lt 10 ]; then
    echo "no time left in the budget: skipped"
    rc=skipped
  else
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
  fi
  local status
  case "$rc" in
    0) status=pass ;;
    skipped) status=skipped ;;
    124|137) status=timeout ;;
    *) status="fail(rc=$rc)" ;;
  esac
  STATUS+=("$status")
  SECS+=($((SECONDS - t0)))
  stamp "=== $name: end, $status, $((SECONDS - t0))s"
  write_summary
}

# -v: one line per test, and the header names the backend the tests run on.
run_section 0 env DGNOPT_TEST_XLA_OPT=1 JAX_ENABLE_X64=1 "$PY" -m pytest -v -p no:cacheprovider \
  --durations=10 "--junitxml=$OUT_DIR/tests.xml" "${TEST_ARGS[@]}"
run_section 1 "$PY" benchmarks/step_time.py --device "$DEVICE" "${STEP_TIME_ARGS[@]}" \
  --out "$OUT_DIR/step_time_$DEVICE.json"
run_section 2 "$PY" benchmarks/step_time.py --device "$DEVICE" --models resnet18 \
  "${RESNET18_ARGS[@]}" --out "$OUT_DIR/step_time_resnet18_$DEVICE.json"
run_section 3 "$PY" benchmarks/batch_scaling.py --device "$DEVICE" "${BATCH_ARGS[@]}" \
  --out "$OUT_DIR/batch_scaling_$DEVICE.json"
run_section 4 "$PY" benchmarks/resnet18_throughput.py --device "$DEVICE" \
  "${THROUGHPUT_ARGS[@]}" --out "$OUT_DIR/resnet18_throughput_$DEVICE.json"

# --- summary -------------------------------------------------------------

echo
stamp "=== summary (device $DEVICE, quick=$QUICK)"
FAILED=0
for i in "${!NAMES[@]}"; do
  printf '  %-20s %-14s %4ss\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
  [ "${STATUS[$i]}" = pass ] || FAILED=1
done
echo "  files in $OUT_DIR:"
ls -1 "$OUT_DIR" | sed 's/^/    /'
stamp "done: $([ $FAILED = 0 ] && echo 'all sections passed' || echo 'some sections did not pass')"
finish $FAILED
