#!/usr/bin/env bash
# Every bench on the GPU, in about 8 minutes, into one table.
#
#   bash bench/gpu.sh [OUT_DIR]      # OUT_DIR defaults to ./gpu-results
#
# Runs, each with --device cuda and a time limit (the sum is 8 minutes): TaylorLoss vs
# cross-entropy (loss_cost), the MetaMD step vs SGD (optim_step --quick), population training
# P = 64 (population), implicit vs unrolled hypergradient at T = 1000 (hypergrad), and one ITL
# outer step vs one CMA-ES generation (itl_vs_cmaes). Each bench's full output goes to
# OUT_DIR/<bench>.log; its closing `RESULT name=value` line goes into OUT_DIR/gpu.md, a Markdown
# table with the time each took and its exit status (124: hit its limit). A bench that fails does
# not stop the others; the script exits non-zero if any did.
set -u -o pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
OUT_DIR="${1:-gpu-results}"
mkdir -p "$OUT_DIR"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: torch sees no CUDA device; nothing to measure" >&2
    exit 2
fi

TABLE="$OUT_DIR/gpu.md"
{
    echo "# GPU benchmarks ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    "$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")'
    echo
    echo "| bench | command | RESULT | seconds | exit |"
    echo "|---|---|---|---|---|"
} > "$TABLE"

failed=0
# name, limit in seconds, then the command
run_bench() {
    local name="$1" limit="$2"
    shift 2
    local log="$OUT_DIR/$name.log" start end status result
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    status=$?
    end=$(date +%s)
    result=$(grep '^RESULT ' "$log" | tail -n 1 | sed 's/^RESULT //')
    [ -n "$result" ] || result="(none)"
    [ "$status" -eq 0 ] || failed=1
    echo "| $name | \`$*\` | \`$result\` | $((end - start)) | $status |" >> "$TABLE"
    tail -n 3 "$log"
}

run_bench loss_cost     60  "$PYTHON" bench/loss_cost.py --device cuda --repeats 300
run_bench optim_step    120 "$PYTHON" bench/optim_step.py --device cuda --quick
run_bench population    120 "$PYTHON" bench/population.py --device cuda --P 64 --model cnn4_gn --rounds 1 --repeats 1
run_bench hypergrad     90  "$PYTHON" bench/hypergrad.py --device cuda --steps 100 1000 --repeats 2
run_bench itl_vs_cmaes  90  "$PYTHON" bench/itl_vs_cmaes.py --device cuda --population 8 --epochs 1

echo
cat "$TABLE"
exit "$failed"
