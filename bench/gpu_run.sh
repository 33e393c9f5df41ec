#!/usr/bin/env bash
# The prepared GPU run: one command for a lent GPU machine, 12 minutes in all, one summary line per step.
#
#   bash bench/gpu_run.sh          # on the GPU machine (its python3 has torch, triton, transformers, peft)
#   bash bench/gpu_run.sh --cpu    # the dry run here: every step that can run on CPU does, the rest say "needs cuda"
#
# It installs the project without fetching anything (pip --no-deps -e .; wheels in .whl/ first, if carried),
# then: bench/gpu_check.py (Triton kernels vs torch at 7B shapes, and a 7B-shaped decode step eager vs CUDA
# graph against its memory roofline); the parity tests on the device (engine vs transformers, multi-LoRA vs
# peft, bfloat16, the CUDA-graph decode path vs eager); SmolLM2-shaped throughput at 1/32/128 concurrent with
# 1 and 32 adapters, graphs off and on. A failing step does not stop the next. Full logs go to $OUT (or
# ./gpu-run-logs), the summary to stdout and $OUT/summary.txt.
set -u
cd "$(dirname "$0")/.."
MODE=cuda
[ "${1:-}" = "--cpu" ] && MODE=cpu
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && [ "$MODE" = cpu ] && echo .venv/bin/python || echo python3 )}
LOGS=${OUT:-gpu-run-logs}
mkdir -p "$LOGS"
SUMMARY="$LOGS/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS COMMAND...: runs with a time limit, full output to $LOGS/NAME.log, one line to the summary.
step() {
    local name=$1 limit=$2 started rc last
    shift 2
    started=$(date +%s)
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    last=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-300)
    [ $rc -eq 124 ] && last="timed out after ${limit}s; last line: $last"
    say "[$name] rc=$rc $(( $(date +%s) - started ))s: $last"
}

needs_cuda() { say "[$1] needs cuda (skipped in --cpu)"; }

say "gpu_run ($MODE) $(date -u +%FT%TZ) python: $($PYTHON -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' 2>&1)"

if [ "$MODE" = cuda ]; then
    install() {
        if compgen -G ".whl/*.whl" > /dev/null; then
            $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
        fi
        $PYTHON -m pip install -q --no-index --no-deps --no-build-isolation -e . && $PYTHON -P -c "import lorafleet.server.engine.engine; print('installed')"
    }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    step install 90 install
    export TRITON_INTERPRET=0  # real kernels: the tests' conftest only sets it where unset
    step gpu_check 200 $PYTHON -P bench/gpu_check.py
    step parity 240 env LORAFLEET_TEST_DEVICE=cuda $PYTHON -P -m pytest -q -p no:cacheprovider --timeout 120 \
        tests/engine/test_engine_parity.py tests/engine/test_multi_lora.py tests/engine/test_decode_graphs.py tests/engine/test_quantized.py tests/engine/test_prefix_cache.py tests/engine/test_speculative.py \
        tests/engine/test_mixtral.py tests/engine/test_prequantized.py -k "not smollm2"  # the GPU machine has no converted SmolLM2
    step throughput 180 $PYTHON -P bench/gpu_throughput.py --device cuda
else
    say "[install] uses this checkout's .venv (--cpu)"
    needs_cuda gpu_check
    step gpu_check_cpu 120 $PYTHON -P -m pytest -q -p no:cacheprovider tests/packaging/test_gpu_check.py
    step parity 300 $PYTHON -P -m pytest -q -p no:cacheprovider tests/engine/test_engine_parity.py tests/engine/test_multi_lora.py tests/engine/test_decode_graphs.py
    step throughput 300 $PYTHON -P bench/gpu_throughput.py --device cpu --concurrency 1 4 --new-tokens 8
    needs_cuda "throughput cuda_graphs on"
fi
say "gpu_run done; logs in $LOGS"
