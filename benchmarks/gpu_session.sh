#!/usr/bin/env bash
# Every GPU check in one go, for a short lease on a GPU machine (docs/RESULTS.md "On a GPU" shows its output):
#   bash benchmarks/gpu_session.sh DATA_DIR OUT_DIR [ANCHORS_DIR]
# 1. the CUDA tests (pytest -m cuda); 2. fast, its variants and seed on the GPU (benchmarks/gpu_record.py);
# 3. the public record airbench94_muon.py on the same GPU right after (ANCHORS_DIR/run-airbench94-muon; its
# max-autotune compilation took over 140 s on an H200, before its first timed run); 4. one epoch of fast under
# torch.profiler. Each step has its own time limit and whole log under OUT_DIR, so a step that fails or
# overruns leaves the others' results. SEEDS (5) and STEPS ("tests record anchor profile") do less.
# A machine without the serve extra needs these wheels (pip download --no-deps ... for its Python), as of
# 2026-12: fastapi starlette pydantic pydantic_core annotated-types annotated-doc typing-inspection
# typing_extensions uvicorn python-multipart swagger-ui-py pooch platformdirs opentelemetry-api
# (fastapi 0.165 imports opentelemetry) and opentelemetry-api's own requirements.
set -u -o pipefail
data=$1 out=$2 anchors=${3:-}
seeds=${SEEDS:-5}
steps=${STEPS:-tests record anchor profile}
mkdir -p "$out"
export CIFAR10_DATA=$data PYTHONUNBUFFERED=1
step() { [[ " $steps " == *" $1 "* ]]; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'; } 2>&1 | tee "$out/machine.txt"

if step tests; then
  timeout 150 python3 -m pytest -m cuda tests/test_cuda.py -n 4 --dist load -p no:cacheprovider -q >"$out/tests.txt" 2>&1
  tail -5 "$out/tests.txt"
fi
if step record; then
  timeout 260 python3 benchmarks/gpu_record.py --data-dir "$data" --seeds "$seeds" --recipes \
    fast fast+micro_batch=500 "fast+compile=true:2" "fast+deterministic=true:1" \
    seed:1 2>&1 | tee "$out/record.txt"
fi
if step anchor && [ -n "$anchors" ]; then
  timeout 300 bash "$anchors/run-airbench94-muon" "$data" "$seeds" 2>&1 | tee "$out/anchor.txt"
fi
if step profile; then
  timeout 30 python3 benchmarks/gpu_record.py --data-dir "$data" --profile fast --rows 30 2>&1 | tee "$out/profile.txt"
fi
