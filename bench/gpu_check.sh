#!/usr/bin/env bash
# The one prepared GPU check. Installs nothing: run it where `pip install -e .` already worked.
#   bash bench/gpu_check.sh OUT_DIR            # on a GPU machine (under 8 minutes on one H200)
#   bash bench/gpu_check.sh OUT_DIR --device cpu   # the CPU fallback CI runs as a smoke test
# Writes OUT_DIR/run-*.csv and OUT_DIR/gpu_check.txt, and exits non-zero if a check fails.
set -euo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--device cpu|gpu]}
device=gpu
if [ "${2:-}" = "--device" ]; then device=${3:?--device needs cpu or gpu}; fi
py=${PYTHON:-python}
export PYTHONUNBUFFERED=1
if [ "$device" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # The best configurations with and without mixed precision and XLA, on the quick set's images.
  configs=tfdata,tfdata-mixed,tfdata-xla,tfdata-mixed-xla,featcache,featcache-mixed,modelonly,modelonly-mixed,modelonly-xla,modelonly-mixed-xla
  "$py" -m bench run --device gpu --preset quick --configs "$configs" --epochs 3 --repeats 1 --timeout 240 --out "$out" || true
else
  # CPU fallback: the same checks on the smoke preset (XLA on CPU is far too slow to include).
  "$py" -m bench run --device cpu --preset smoke --configs tfdata,tfdata-mixed,featcache,modelonly,modelonly-mixed \
    --out "$out" || true
fi
"$py" -m bench.gpu_check "$out/latest.csv" --device "$device" | tee "$out/gpu_check.txt"
