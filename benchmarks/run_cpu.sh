#!/usr/bin/env bash
# The CPU suite: every benchmark script on one parameter set, results under benchmarks/results/.
#
#   bash benchmarks/run_cpu.sh                          # the `cpu` set, 2 threads
#   PRESET=tiny THREADS=1 TAG=1t bash benchmarks/run_cpu.sh
#   UPSTREAM=~/src/SOAP/soap.py bash benchmarks/run_cpu.sh   # + the authors' SOAP in the step benchmark
#
# Knobs: PRESET (default cpu), THREADS (default 2), TAG (suffix of the result names), BUDGET
# (seconds per op row, default 2), OUT_DIR (default benchmarks/results), ONLY (space-separated
# subset of: step rotate moments statistics refresh adam), PYTHON. A failing script is reported
# and the others still run; the exit status counts the failures.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
PRESET="${PRESET:-cpu}"
THREADS="${THREADS:-2}"
BUDGET="${BUDGET:-2}"
OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results}"
ONLY="${ONLY:-step rotate moments statistics refresh adam}"
common=(--preset "$PRESET" --threads "$THREADS" --out-dir "$OUT_DIR")
[[ -n "${TAG:-}" ]] && common+=(--tag "$TAG")
failures=0
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
for bench in $ONLY; do
    args=("${common[@]}")
    case "$bench" in
        step) [[ -n "${UPSTREAM:-}" ]] && args+=(--upstream "$UPSTREAM") ;;
        *) args+=(--budget "$BUDGET") ;;
    esac
    echo "==> bench_$bench.py ${args[*]}"
    "$PYTHON" "benchmarks/bench_$bench.py" "${args[@]}" || { echo "bench_$bench.py FAILED"; failures=$((failures + 1)); }
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown); failures: $failures"
exit "$failures"
