#!/usr/bin/env bash
# On a CUDA machine with torch, triton and transformers installed (no install step):
# run the test suite without the interpreter, then the kernel benchmarks.
# Results land in benchmarks/results/ (and are copied to $OUT when set, for the device tool).
#   bash benchmarks/run_gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
slug=$(python -c "from benchmarks._common import device_slug; print(device_slug())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 300 python -m pytest -q -rs tests 2>&1 | tail -40 | tee "benchmarks/results/pytest_cuda_${slug}.txt"
for bench in benchmarks/bench_*.py; do timeout 200 python "$bench"; done
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*"${slug}"* "$OUT"/; fi
