#!/usr/bin/env bash
# One call on a CUDA machine gives every kernel number:
#   1. the test suite on CUDA with the Triton interpreter off (the kernel tests then run the
#      compiled kernels on GPU tensors); MSN_CODEGEN_FULL=1 adds the full codegen sweep (slow);
#   2. the kernel benchmarks (benchmarks/bench_kernels.py: tables, JSON, PNG);
#   3. decode steps end to end on Llama3-8B shapes (random weights, bf16, all 32 layers;
#      benchmarks/bench_step_graph.py): host time per step eager vs CUDA graph replay, greedy
#      ms/step against transformers, tr-jacobi (auto tree, paper mode) step time vs greedy;
#   4. every pytest-benchmark benchmark in benchmarks/ with timing enabled (JSON);
#   5. a summary table in $OUT/gpu_suite.md with the card, commit and commands.
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]   (default benchmarks/results)
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0
unset MSN_KERNELS

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA device visible to torch; nothing to measure" >&2
    exit 2
fi

card="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

tests_cmd="python -m pytest tests -q -p no:cacheprovider"
echo "== $tests_cmd"
export MSN_CODEGEN_FULL="${MSN_CODEGEN_FULL:-0}"
$tests_cmd 2>&1 | tee "$OUT/tests.log"
tests_status=${PIPESTATUS[0]}

bench_cmd="python benchmarks/bench_kernels.py --out $OUT"
echo "== $bench_cmd"
$bench_cmd 2>&1 | tee "$OUT/bench_kernels.log"
bench_status=${PIPESTATUS[0]}

step_cmd="python benchmarks/bench_step_graph.py --out $OUT"
echo "== $step_cmd"
timeout 300 $step_cmd 2>&1 | tee "$OUT/bench_step_graph.log"
step_status=${PIPESTATUS[0]}

pybench_cmd="python -m pytest benchmarks -q -p no:cacheprovider --benchmark-enable --benchmark-json $OUT/pytest_benchmarks.json"
echo "== $pybench_cmd"
$pybench_cmd 2>&1 | tee "$OUT/pytest_benchmarks.log"
pybench_status=${PIPESTATUS[0]}

{
    echo "# GPU suite"
    echo
    echo "| item | value |"
    echo "|---|---|"
    echo "| card | $card |"
    echo "| commit | $commit |"
    echo "| date | $(date -u +%Y-%m-%dT%H:%MZ) |"
    echo "| tests | \`MSN_CODEGEN_FULL=$MSN_CODEGEN_FULL TRITON_INTERPRET=0 $tests_cmd\`: $(tail -1 "$OUT/tests.log") (exit $tests_status) |"
    echo "| kernel benchmarks | \`$bench_cmd\` (exit $bench_status) |"
    echo "| decode steps (8B shapes) | \`$step_cmd\` (exit $step_status) |"
    echo "| pytest benchmarks | \`$pybench_cmd\`: $(tail -1 "$OUT/pytest_benchmarks.log") (exit $pybench_status) |"
    echo
    if [ -f "$OUT/kernels.md" ]; then
        sed 's/^# /## /' "$OUT/kernels.md"
        echo
        echo "![tree_attention GB/s](tree_attention_gbps.png)"
    fi
    if [ -f "$OUT/step_graph.md" ]; then
        echo
        sed 's/^# /## /' "$OUT/step_graph.md"
    fi
} > "$OUT/gpu_suite.md"

echo "wrote $OUT/gpu_suite.md"
exit $(( tests_status != 0 || bench_status != 0 || step_status != 0 || pybench_status != 0 ))
