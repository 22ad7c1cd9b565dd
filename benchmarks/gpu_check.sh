set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
timeout 300 python -m pytest -q -rs tests 2>&1 | tail -40 | tee $OUT/pytest_cuda.txt
timeout 200 python benchmarks/bench_group_minmax.py 2>&1 | tail -80 | tee $OUT/bench.txt
cp benchmarks/results/* $OUT/ 2>/dev/null; ls $OUT
