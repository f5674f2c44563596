#!/usr/bin/env bash
# One prepared run on a CUDA machine (about 6 minutes on an H200): the Triton tests
# compiled for the GPU, then the checks and the benchmark. Results land in ${OUT:-.}.
#   OUT=/some/dir bash benchmarks/gpu/run_device.sh [extra bench_cuda.py arguments]
set -u
out="${OUT:-.}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$out/versions.txt"
# every test runs (no -x); the whole output, each failure's short traceback and the
# summary of failures/errors/xpasses, goes to tests_full.txt; the console gets its tail
timeout 150 python -m pytest tests/triton -q -rfEX --tb=short -p no:cacheprovider \
  > "$out/tests_full.txt" 2>&1
echo "pytest exit status: $?" >> "$out/tests_full.txt"
tail -40 "$out/tests_full.txt" | tee "$out/tests.txt"
timeout 330 python benchmarks/gpu/bench_cuda.py --max-minutes 4.5 --json "$out/bench.json" "$@" \
  2>&1 | tee "$out/bench.txt"
