#!/usr/bin/env bash
# Prepared runs on a CUDA machine (results land in ${OUT:-.}), in parts that each fit one
# lent-machine command (10 minutes at most):
#   OUT=dir bash benchmarks/gpu/run_device.sh [PART] [extra bench_cuda.py arguments]
# PART: bench (default: float64 checks + every contender, ~5 min on an H200),
#       sweep (the linear head's chunk rows and dW dtype, ~30 s, then the Triton kernel's
#             launch variants, ~3 min, then their tests on the GPU),
#       tests (tests/triton compiled for the GPU, up to 240 s),
#       all   (bench, then tests: ~7.5 min; the sweep separately).
set -uo pipefail
status=0
out="${OUT:-.}"
part="bench"
case "${1:-}" in bench|sweep|tests|all) part="$1"; shift ;; esac
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$out/versions.txt"
run_tests() {
  # every test runs (no -x); the whole output, each failure's short traceback and the
  # summary of failures/errors/xpasses, goes to tests_full.txt; the console gets its tail
  timeout 240 python -m pytest tests/triton -q -rfEX --tb=short -p no:cacheprovider \
    > "$out/tests_full.txt" 2>&1
  local rc=$?
  echo "pytest exit status: $rc" >> "$out/tests_full.txt"
  tail -40 "$out/tests_full.txt" | tee "$out/tests.txt"
  return $rc
}
case "$part" in
  bench|all)
    timeout 330 python benchmarks/gpu/bench_cuda.py --max-minutes 4.5 --json "$out/bench.json" "$@" \
      2>&1 | tee "$out/bench.txt" || status=1
    if [ "$part" = all ]; then run_tests || status=1; fi ;;
  sweep)
    timeout 330 python benchmarks/gpu/bench_cuda.py --sweep-only --head-sweep --max-minutes 5 \
      --json "$out/sweep.json" "$@" 2>&1 | tee "$out/sweep.txt" || status=1
    timeout 200 python -m pytest tests/triton/test_triton_kernel_variants.py -q -p no:cacheprovider \
      2>&1 | tail -5 | tee "$out/variants_tests.txt" || status=1 ;;
  tests) run_tests || status=1 ;;
esac
exit $status
