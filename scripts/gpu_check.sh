#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (under 6 minutes on an H100): the Triton kernels compiled
# (not interpreted) against their references, the dispatcher, the FP8 _scaled_mm path, CUDA-event timing
# of instrument(), the 2:4 sparse-tensor-core test, then benchmarks/bench_triton.py, which writes ONE
# JSON into benchmarks/results/<device>-<date>.json (commit it). Meant for a borrowed GPU machine
# without network access, where every second counts.
#
#   bash scripts/gpu_check.sh wheels        # here (with network): the pure-Python wheels into .whl/
#   bash scripts/gpu_check.sh run [OUTDIR]  # there (carry .whl/): install them, test, benchmark
#   bash scripts/gpu_check.sh dry [OUTDIR]  # here, on CPU: the same steps under TRITON_INTERPRET=1 with
#                                           # tiny shapes, JSON to a tmp path marked dry (proves it runs)
#
# The GPU machine is expected to have torch, triton and transformers; the wheels add what the
# package and its tests need beyond those (gguf, OpenTelemetry). Tests run with
# TORCHCOMPRESS_TRITON_AUTOTUNE=0: autotuning every test shape would compile and time each
# configuration (on an H100 the non-slow set took under 2 minutes without it; with it, 22 tests took 300 s).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(gguf==0.19.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
        opentelemetry-exporter-otlp==1.45.2 opentelemetry-exporter-otlp-proto-grpc==1.45.2
        opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
        opentelemetry-proto==1.45.2 opentelemetry-exporter-http-transport==0.66b2
        opentelemetry-exporter-otlp-common==0.66b2 googleapis-common-protos==1.76.0)

case "${1:-}" in
wheels)
    mkdir -p .whl
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls .whl
    ;;
run|dry)
    mode=$1
    out=${2:-gpu_check_out}
    mkdir -p "$out"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tc-site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/tc-site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    TESTS=(tests/ops/test_int_linear_triton.py tests/ops/test_gguf_gptq_triton.py tests/ops/test_gptq_block_triton.py
           tests/ops/test_regimes.py tests/ops/test_fp8_kernel.py tests/ops/test_compile_ops.py
           tests/ops/test_triton_aot.py tests/primitives/test_kernel_layout.py tests/telemetry/test_hooks.py
           tests/prune/test_gradual_semi.py)
    if [ "$mode" = dry ]; then
        export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        python3 -c "import torch, triton; print('DRY RUN on CPU: torch', torch.__version__, 'triton', triton.__version__)" || exit 1
        timeout 300 python3 -m pytest -q -p no:cacheprovider -m "not slow" -k "not never_loads" "${TESTS[@]}" \
            2>&1 | tee "$out/tests.log" | tail -5
        [ "${PIPESTATUS[0]}" = 0 ] || exit 1
        timeout 300 python3 benchmarks/bench_triton.py --dry 2>&1 | tee "$out/bench_triton.log"
        [ "${PIPESTATUS[0]}" = 0 ] || exit 1
        json=$(sed -n 's/^wrote \(.*\.json\) (dry)$/\1/p' "$out/bench_triton.log" | tail -1)
        [ -n "$json" ] && cp -v "$json" "$out/"
        exit 0
    fi
    nvidia-smi -L
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
    TORCHCOMPRESS_TRITON_AUTOTUNE=0 timeout 170 python3 -m pytest -q -rfEs -p no:cacheprovider --durations=8 \
        -m "gpu or not slow" -k "not never_loads" "${TESTS[@]}" 2>&1 | tee "$out/tests.log" | tail -25
    # autotuned (the numbers are the tuned kernels'); the JSON lands in benchmarks/results/
    timeout 240 python3 benchmarks/bench_triton.py --budget-s 150 2>&1 | tee "$out/bench_triton.log"
    # the JSON it wrote (named by device and date) beside the logs, for a caller that only gets OUTDIR back
    json=$(sed -n 's/^wrote \(.*\.json\)$/\1/p' "$out/bench_triton.log" | tail -1)
    [ -n "$json" ] && cp -v "$json" "$out/"
    if [ "$SECONDS" -lt 270 ]; then  # only while the whole run stays under 6 minutes
        timeout 60 python3 benchmarks/bench_telemetry.py --model random --rounds 15 --calls 20 --seq-len 128 \
            > "$out/bench_telemetry.log" 2>&1
        tail -12 "$out/bench_telemetry.log"
    else
        echo "bench_telemetry skipped: ${SECONDS}s spent, it would push the run past 6 minutes"
    fi
    ;;
*)
    sed -n 2,12p "$0"
    exit 2
    ;;
esac
