#!/usr/bin/env bash
# Issue 14's GPU checks in one run, for a lent GPU machine (docs/gpu.md, "Running the GPU checks"):
# the GPU-only tests (no host sync inside an epoch, fused optimizers, compile) and the GPU loop
# benchmark (ResNet-18 224 px bf16 images/s and MFU, eager vs compiled with CUDA graphs, time
# to first step), each bounded by its own timeout so that one hang leaves time for the rest.
#
# Run from the repository root. On the device machine (no package index): first, here,
# `bash scripts/gpu-wheels.sh`, then call the device tool with carry [".whl"] and the command
# `bash scripts/gpu-check.sh`. Everything is also written under $OUT (what the tool brings back).
# On any machine with this checkout's .venv: `PY=.venv/bin/python bash scripts/gpu-check.sh`
# (without CUDA the tests skip and the benchmark measures its CPU part only).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d)}
TESTS_S=${TESTS_S:-180}
BENCH_S=${BENCH_S:-360}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$OUT"
# The packages hpo needs beyond the machine's own, from .whl/ (scripts/gpu-wheels.sh), unless
# this Python has them already (a checkout's .venv).
if ! "$PY" -c "import optuna, sqlalchemy, pydantic" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hpo-site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/hpo-site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/tests/support"
echo "results under $OUT"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

echo "== GPU-only tests (tests/test_vision_gpu.py), at most ${TESTS_S}s"
timeout "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_vision_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt"
tests_rc=$?

echo "== benchmarks/gpu_loop.py (eager, compiled, compiled with CUDA graphs), at most ${BENCH_S}s"
timeout "$BENCH_S" "$PY" benchmarks/gpu_loop.py 2>&1 | tee "$OUT/gpu-loop.txt"
bench_rc=$?

echo "tests rc $tests_rc, benchmark rc $bench_rc (124: its timeout)" | tee "$OUT/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
