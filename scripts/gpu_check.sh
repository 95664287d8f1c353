#!/usr/bin/env bash
# The CUDA checks in one go, on a machine with a GPU and a CUDA build of torch already installed
# (this project's pinned torch is the CPU wheel): builds the C kernels in place, runs the GPU
# tests, then the limits and engine benchmarks on the GPU, then the engine at batch 128 and 512 (bf16)
# with --cuda-graphs off and on (off: against transformers too), each in OUT_DIR/bench-bBATCH-graphs-on|off.
#
#   scripts/gpu_check.sh [OUT_DIR]     (default: gpu-check-out; logs and bench JSON/PNG go there)
set -uo pipefail
out=${1:-gpu-check-out}
mkdir -p "$out/bench"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
$python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    || exit 1
$python setup.py -q build_ext --inplace >"$out/build.log" 2>&1 || echo "C kernels not built (see build.log)"
$python -c "from glinthawk.compute import cbind
print('C kernels:', cbind._attention is not None, cbind._elementwise is not None, cbind._sampling is not None)"

timeout 360 $python -m pytest -m gpu tests/test_gpu.py -rs -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" \
    || status=1
timeout 120 $python -m glinthawk bench limits --device cuda --set matmul_sizes=1024,4096,8192 \
    --out "$out/bench" 2>&1 | tee "$out/bench_limits.log" || status=1
timeout 240 $python -m glinthawk bench engine --device cuda --set matmul_sizes=1024,4096,8192 \
    --out "$out/bench" 2>&1 | tee "$out/bench_engine.log" || status=1
for batch in 128 512; do
    for graphs in off on; do
        hf=$([ $graphs = off ] && echo true || echo false)
        timeout 300 $python -m glinthawk bench engine --device cuda --dtype bfloat16 --set batch=$batch \
            --set long_batch=0 --set cuda_graphs=$graphs --set hf=$hf --set matmul_sizes=1024,4096,8192 \
            --out "$out/bench-b$batch-graphs-$graphs" 2>&1 | tee "$out/bench_engine_b${batch}_graphs_$graphs.log" \
            || status=1
    done
done
exit $status
