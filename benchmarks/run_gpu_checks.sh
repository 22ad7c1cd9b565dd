#!/usr/bin/env bash
# GPU checks in at most ~6 minutes of wall time, on a CUDA machine with torch, triton and transformers
# installed (nothing is installed here). Steps, most valuable first, each under its own timeout cut to
# the time left:
#   a. versions and the GPU (nvidia-smi)
#   b. correctness: decode kernel vs its reference (Llama-3-8B shape, 4k tokens, rank/pre, fp16/bf16, groups 64/16,
#      4 bits; then 2, 3 and 8 bits in rank mode), prefill kernel vs its reference (1k tokens) -> correct_<gpu>.csv
#   c. decode timing: B=8 x 32k, B=1 x 32k, B=8 x 4k, then B=1 x (32k + 32): a step with 32 keys in the
#      full-precision window, as most steps hold (the others are whole blocks of 64: no window); eigenkv rank/pre
#      vs SDPA fp16 (each backend that runs) and the copy bandwidth; plain and CUDA-graph timing -> decode_<gpu>.csv
#   d. prefill timing at 8k and 32k vs SDPA fp16             -> prefill_<gpu>.csv
#   e. end-to-end generate, B=8 x 4k and 32k prompts, 64 new tokens, on a 4-layer Llama-3-8B-shaped random
#      model: decode tokens/s, prefill s, peak memory and KV bytes of transformers' dynamic / static /
#      quantized caches vs eigenkv's quantized and low-rank + quantized caches, the latter two also through
#      eigenkv.graphs.generate_static (decode step captured as a CUDA graph: capture s, graphed 1/0) (90 s)
#      -> generate_<gpu>.csv (its own long format: device, model, method, batch, prompt_tokens, new_tokens,
#      metric, value)
#   e2. decode in rank mode at B=8 x 32k at register caps 168 and 255 (modes rank@168r, rank@255r; the
#      launch config's cap is the decode step's rank rows)  -> decode_<gpu>.csv
#   f. if time is left: pytest of the captured generation (tests/test_graphs.py, a real CUDA graph), device_map
#      splits (tests/test_device_map.py) and the
#      attention kernels (90 s) -> pytest_kernels_<gpu>.txt
# Every Python step appends its CSV rows (long format: device, step, shape, dtype, method, mode, timing,
# batch, context, metric, value) as each point is measured, so a step killed by its timeout keeps what
# it finished. Results go to $OUT when set, else benchmarks/results/; the whole log to gpu_checks_<gpu>.log.
#   PYTHONPATH=. bash benchmarks/run_gpu_checks.sh
# GPU_CHECKS_SECONDS (default 330) is the wall-time budget of the whole script. GPU_CHECKS_SMOKE=1 is a
# CPU dry run of the script itself: tiny sizes, kernels in the Triton interpreter, one kernel test (and the
# CUDA graph test, skipped on CPU: its name checked).
set -uo pipefail # no -e: a failed or timed-out step must not stop the next one
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${GPU_CHECKS_SECONDS:-330}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
slug=$(printf '%s' "${gpu:-no-gpu}" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]/-/g; s/--*/-/g; s/^-//; s/-$//')

if [[ ${GPU_CHECKS_SMOKE:-0} == 1 ]]; then
	export TRITON_INTERPRET=1
	smoke=(--cpu-smoke)
	decode_points=1x256 prefill_lengths=64 graph=() kernel_tests="tests/test_graphs.py::test_a_captured_step_replays_as_eager_steps tests/kernels/test_lowrank_decode.py::test_key_bounds_accept_one_range_per_row_only"
	# a tiny random Llama; 192 tokens pass the 128-token full-precision window, so the caches quantize
	generate=(--model llama-tiny --layers 2 --batches 2 --prompt-lengths 64,192 --new-tokens 4)
else
	smoke=()
	# the captured generation's tests (short; one captures a real CUDA graph), then the attention kernels' tests
	# (odd shapes against the references): what the interpreter cannot prove about a GPU (alignment claims,
	# layouts); the other kernel tests compile for GPUs on CPU already
	decode_points=8x32768,1x32768,8x4096,1x32800 prefill_lengths=8192,32768 graph=(--graph)
	kernel_tests="tests/test_graphs.py tests/test_device_map.py tests/kernels/test_lowrank_decode.py tests/kernels/test_lowrank_prefill.py"
	generate=(--batches 8 --prompt-lengths 4096,32768 --new-tokens 64)
fi

# (${a[@]+"${a[@]}"}: an empty array expands to nothing under `set -u` in bash < 4.4 too)

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, cut to the time left; print how it ended
step() {
	local name=$1 limit=$2
	shift 2
	local left=$((BUDGET - SECONDS))
	if ((left < 20)); then
		echo "=== $name: skipped, ${left}s of the budget left"
		return
	fi
	((limit > left)) && limit=$left
	echo "=== $name: up to ${limit}s (${SECONDS}s elapsed, $(date +%T))"
	local began=$SECONDS
	timeout -k 5 "$limit" "$@"
	local rc=$?
	local how="exit $rc"
	((rc == 124 || rc == 137)) && how="timed out (exit $rc): the rows written so far are kept"
	echo "=== $name: $how after $((SECONDS - began))s"
}

checks() {
	step versions 45 bash -c '
		nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
		nvidia-smi --query-gpu=clocks.max.sm,clocks.max.memory,power.limit --format=csv # apart: a field unknown here fails only this line
		"$0" -c "
import sys, torch, triton, transformers
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"triton\", triton.__version__, \"transformers\", transformers.__version__)
if torch.cuda.is_available():
    print(\"device\", torch.cuda.get_device_name(), \"capability\", torch.cuda.get_device_capability())
"' "$PY"
	step correctness 100 "$PY" benchmarks/check_gpu_correctness.py ${smoke[@]+"${smoke[@]}"} --out "$out"
	step decode 130 "$PY" benchmarks/bench_decode.py ${smoke[@]+"${smoke[@]}"} ${graph[@]+"${graph[@]}"} --shapes llama3-8b \
		--points "$decode_points" --out "$out"
	step prefill 60 "$PY" benchmarks/bench_prefill.py ${smoke[@]+"${smoke[@]}"} --shapes llama3-8b --batches 1 \
		--lengths "$prefill_lengths" --out "$out"
	step generate 90 "$PY" benchmarks/bench_generate.py "${generate[@]}" --out "$out"
	# rank mode's register cap: the launch config's 128 (four programs per SM) against 168 (three) and 255 (two)
	step decode-caps 45 "$PY" benchmarks/bench_decode.py ${smoke[@]+"${smoke[@]}"} ${graph[@]+"${graph[@]}"} \
		--shapes llama3-8b --points "${decode_points%%,*}" --modes rank --register-caps 168,255 --sdpa-backends flash --out "$out"
	if ((BUDGET - SECONDS >= 60)); then
		# -p no:cacheprovider: nothing written into the checkout; the output goes to a file as it runs
		step pytest-kernels 90 bash -c '"$0" -m pytest -q -rs --tb=short -p no:cacheprovider $2 >"$1" 2>&1; rc=$?
			tail -n 25 "$1"; exit $rc' "$PY" "$out/pytest_kernels_${slug}.txt" "$kernel_tests"
	else
		echo "=== pytest-kernels: skipped, $((BUDGET - SECONDS))s of the budget left"
	fi
	echo "=== done in ${SECONDS}s; files in $out:"
	ls -l "$out"
}

# a pipeline, not `exec > >(tee)`: the script returns only once the log is complete
checks 2>&1 | tee -a "$out/gpu_checks_${slug}.log"
