#!/usr/bin/env bash
# One command for a GPU machine: build, GPU tests, the benchmark suite at GPT-2 small and medium,
# the per-kernel Triton benchmark; everything (logs, JSON, CSV, PNG, a summary) under $OUT.
#
#   bash benchmarks/run_gpu.sh                   # on the GPU machine, from the repository root
#   OUT=/somewhere bash benchmarks/run_gpu.sh
#   bash benchmarks/run_gpu.sh --cpu-dry-run     # anywhere: the same plumbing on the CPU, tiny set,
#                                                # no install, tests only collected
#
# Knobs (environment): OUT (default ./gpu-results), PRESETS (default "gpt2-small gpt2-medium"),
# STEP_DTYPES (parameter storage in the step benchmark, default fp32,bf16),
# STAGES (default "env build tests bench kernels plot lm"; any subset, in that order), SKIP_BUILD=1,
# TEST_TIMEOUT / BENCH_TIMEOUT / KERNELS_TIMEOUT / LM_TIMEOUT (seconds per command: 900 / 900 / 600 / 590),
# LM_ARGS (extra train_lm.py arguments for the lm stage, e.g. "--seeds 0,1"),
# UPSTREAM=/path/to/soap.py (the paper authors' SOAP, timed in the step benchmark), PYTHON.
# A failing stage or benchmark is recorded in $OUT/summary.txt and the run goes on; the exit status
# is 0 only when every command succeeded.
#
# Where one command may run at most ~10 minutes, split it (the build stays on a warm machine):
#   STAGES="env build tests" bash benchmarks/run_gpu.sh
#   STAGES="bench plot" PRESETS=gpt2-small bash benchmarks/run_gpu.sh
#   STAGES="bench plot" PRESETS=gpt2-medium bash benchmarks/run_gpu.sh
#   STAGES="kernels" bash benchmarks/run_gpu.sh
#   STAGES="lm" bash benchmarks/run_gpu.sh        # the main job, gpu preset (AdamW, SOAP, Shampoo)
set -euo pipefail

DRY=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python
STAGES="${STAGES:-env build tests bench kernels plot lm}"
# Importable from the checkout even when the editable install fails (the package is pure Python
# without its optional extension).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DRY" == 1 ]]; then
    PRESETS="${PRESETS:-tiny}"
    DEVICE=cpu
    BUDGET=0.2
    export CUDA_VISIBLE_DEVICES=""
else
    PRESETS="${PRESETS:-gpt2-small gpt2-medium}"
    DEVICE=cuda
    BUDGET=1.0
fi
STEP_DTYPES="${STEP_DTYPES:-$([[ "$DRY" == 1 ]] && echo fp32 || echo fp32,bf16)}"
TEST_TIMEOUT="${TEST_TIMEOUT:-900}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-900}"
KERNELS_TIMEOUT="${KERNELS_TIMEOUT:-600}"
LM_TIMEOUT="${LM_TIMEOUT:-590}"

SUMMARY="$OUT/summary.txt"
FAILURES=0
echo "run_gpu.sh $(date -u +%FT%TZ) dry=$DRY presets='$PRESETS' device=$DEVICE stages='$STAGES'" >>"$SUMMARY"

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

# run NAME TIMEOUT CMD...: log to $OUT/logs/NAME.log, record status and duration, never abort.
run() {
    local name="$1" limit="$2"
    shift 2
    mkdir -p "$OUT/logs"
    local log="$OUT/logs/$name.log" start rc=0
    start=$(date +%s)
    echo "==> $name: $*"
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=30 "$limit" "$@" >"$log" 2>&1 || rc=$?
    else
        "$@" >"$log" 2>&1 || rc=$?
    fi
    local took=$(( $(date +%s) - start ))
    if [[ "$rc" == 0 ]]; then
        printf '%-34s ok      %5ss\n' "$name" "$took" | tee -a "$SUMMARY"
    else
        FAILURES=$((FAILURES + 1))
        local why="exit $rc"
        [[ "$rc" == 124 || "$rc" == 137 ]] && why="timed out after ${limit}s"
        printf '%-34s FAILED  %5ss  (%s; tail of %s below)\n' "$name" "$took" "$why" "logs/$name.log" | tee -a "$SUMMARY"
        tail -n 15 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
    return 0
}

# ---------------------------------------------------------------------------------------- env
if has_stage env; then
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified files"
        echo "host: $(uname -a)"
        command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi || echo "nvidia-smi: not found"
        command -v nvcc >/dev/null 2>&1 && nvcc --version || echo "nvcc: not found"
    } >"$OUT/environment.txt" 2>&1 || true
    run versions 120 "$PYTHON" -c "
import json, platform, torch
info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton; info['triton'] = triton.__version__
except Exception as exc:
    info['triton'] = repr(exc)
print(json.dumps(info, indent=1))
"
fi

# ---------------------------------------------------------------------------------------- build
if has_stage build; then
    if [[ "$DRY" == 1 || "${SKIP_BUILD:-0}" == 1 ]]; then
        echo "build: skipped (dry run or SKIP_BUILD=1); would run: $PYTHON -m pip install --no-build-isolation --no-deps -e ." | tee -a "$SUMMARY"
    elif [[ ! -f csrc/sources.txt ]]; then
        echo "build: skipped: the native extension's sources (csrc/sources.txt) are not in this checkout" | tee -a "$SUMMARY"
    else
        # No network on the machine: no build isolation, no dependency resolution. setup.py
        # installs the package without its extension (with a warning) when the build fails.
        run build 1200 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
    fi
    run backend-info 120 "$PYTHON" -c "
import json, soap_kernels
from soap_kernels import _native
print(json.dumps(soap_kernels.backend_info(), indent=1, default=str))
print('native extension:', _native.available(), _native.load_error())
"
    cp "$OUT/logs/backend-info.log" "$OUT/backend_info.txt" 2>/dev/null || true
fi

# ---------------------------------------------------------------------------------------- tests
if has_stage tests; then
    if [[ "$DRY" == 1 ]]; then
        run tests-collect "$TEST_TIMEOUT" "$PYTHON" -m pytest tests -q --collect-only -p no:cacheprovider
    else
        run tests "$TEST_TIMEOUT" "$PYTHON" -m pytest tests -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml"
    fi
fi

# ---------------------------------------------------------------------------------------- bench
if has_stage bench; then
    RES="$OUT/results"
    mkdir -p "$RES"
    PRESET_LIST="${PRESETS// /,}"
    step_args=(--device "$DEVICE" --out-dir "$RES" --param-dtypes "$STEP_DTYPES")
    if [[ -n "${UPSTREAM:-}" ]]; then
        step_args+=(--upstream "$UPSTREAM")
    fi
    if [[ "$DRY" == 1 ]]; then
        step_args+=(--cycles 1 --frequency 3)
    else
        step_args+=(--cycles 2)
    fi
    # One command per parameter set: a set that fails or runs out of time keeps the others.
    for preset in $PRESETS; do
        run "bench_step_$preset" "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_step.py --preset "$preset" "${step_args[@]}"
    done
    precisions=fp32
    [[ "$DRY" == 1 ]] || precisions=fp32,tf32,bf16
    run bench_rotate "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_rotate.py --preset "$PRESET_LIST" --device "$DEVICE" \
        --out-dir "$RES" --budget "$BUDGET" --precisions "$precisions"
    run bench_statistics "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_statistics.py --preset "$PRESET_LIST" \
        --device "$DEVICE" --out-dir "$RES" --budget "$BUDGET"
    moment_args=(--preset "$PRESET_LIST" --device "$DEVICE" --out-dir "$RES" --budget "$BUDGET")
    [[ "$DRY" == 1 ]] || moment_args+=(--compile)
    run bench_moments "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_moments.py "${moment_args[@]}"
    run bench_refresh "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_refresh.py --preset "$PRESET_LIST" --device "$DEVICE" \
        --out-dir "$RES" --budget "$BUDGET"
    run bench_adam "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_adam.py --preset "$PRESET_LIST" --device "$DEVICE" \
        --out-dir "$RES" --budget "$BUDGET"
    if [[ "$DRY" == 1 ]]; then
        run pytest-benchmark "$BENCH_TIMEOUT" "$PYTHON" -m pytest benchmarks -q -p no:cacheprovider
    else
        run pytest-benchmark "$BENCH_TIMEOUT" "$PYTHON" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
            --benchmark-json="$RES/pytest_benchmark_small.json"
    fi
fi

# ---------------------------------------------------------------------------------------- kernels
if has_stage kernels; then
    mkdir -p "$OUT/results"
    if [[ "$DRY" == 1 ]]; then
        run bench_kernels_gpu "$KERNELS_TIMEOUT" "$PYTHON" benchmarks/bench_kernels_gpu.py --dry-run
    else
        run bench_kernels_gpu "$KERNELS_TIMEOUT" "$PYTHON" benchmarks/bench_kernels_gpu.py --out "$OUT/results/kernels_gpu.json"
    fi
fi

# ---------------------------------------------------------------------------------------- plot
if has_stage plot; then
    shopt -s nullglob
    steps=("$OUT"/results/step_*.json)
    if (( ${#steps[@]} )); then
        run plot "$BENCH_TIMEOUT" "$PYTHON" benchmarks/plot.py "${steps[@]}" -o "$OUT/results/step_summary_$DEVICE.png"
    fi
fi

# ---------------------------------------------------------------------------------------- lm
# The main job on the GPU preset. A grid that runs out of time is recorded as failed but keeps the
# runs it finished in results.json (train_lm.py rewrites it after every run).
if has_stage lm; then
    # shellcheck disable=SC2206
    extra=(${LM_ARGS:-})
    if [[ "$DRY" == 1 ]]; then
        run train_lm "$LM_TIMEOUT" "$PYTHON" python/train_lm.py --preset tiny --no-progress --out "$OUT/lm" "${extra[@]}"
    else
        run train_lm "$LM_TIMEOUT" "$PYTHON" python/train_lm.py --preset gpu --device cuda --bf16 --no-progress \
            --out "$OUT/lm" "${extra[@]}"
    fi
fi

echo "failures: $FAILURES" | tee -a "$SUMMARY"
echo "everything is under $OUT (summary.txt, logs/, results/)"
[[ "$FAILURES" == 0 ]]
