#!/usr/bin/env bash
# Every GPU measurement issue 5 asks for, in one device call (docs/benchmarks.md records them):
#   bash bench/gpu.sh            # on the device machine, from the repository root
# 1. the GPU tests (Triton kernels against their references, cuda_ipc between processes),
# 2. `kleave bench kernels --json`: decode attention, fused MoE, KV transfer cuda_ipc vs tcp,
# 3. end to end: the `small` model, Colocated and PD, every worker on the one GPU.
# Full outputs go under $OUT (the device tool brings them back); the tail is a summary.
# The timeouts add up to 9 minutes, inside one call of the device tool.
set -u
OUT=${OUT:-/tmp/kleave-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
step() { echo "== $1 ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.csv"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
  | tee "$OUT/versions.txt"

step "GPU tests"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_workers_kernels.py tests/test_workers_transport.py tests/test_workers_kv_arena.py \
  > "$OUT/pytest-gpu.txt" 2>&1
echo "pytest exit $?"; tail -n 3 "$OUT/pytest-gpu.txt"

step "kernels and KV transfer"
timeout 240 "$PY" -m kleave bench kernels --json > "$OUT/kernels.json" 2> "$OUT/kernels.log"
echo "bench kernels exit $?"
"$PY" - "$OUT/kernels.json" > "$OUT/kernels.md" <<'PYEOF' && cat "$OUT/kernels.md"
import json, sys
from kleave.workers.bench_kernels import Report, render_markdown
print(render_markdown(Report(**json.load(open(sys.argv[1])))))
PYEOF

step "end to end, small model"
KLEAVE_BENCH_MODEL=small KLEAVE_BENCH_DEVICE=cuda KLEAVE_BENCH_TOPOLOGIES=Colocated,PD \
  KLEAVE_BENCH_ISL=512 KLEAVE_BENCH_OSL=128 KLEAVE_BENCH_CONCURRENCY=1,16 \
  timeout 180 "$PY" -m bench workers > "$OUT/workers-gpu.md" 2> "$OUT/workers-gpu.log"
echo "bench workers exit $?"; cat "$OUT/workers-gpu.md"
