#!/usr/bin/env bash
# One device session's measurements in one call, within the 600 s a device command may run:
#   1. eager SDPA decode on 8 rows, CUDA_LAUNCH_BLOCKING (does the cuDNN-free decode attention hold?), <= 90 s
#   2. make bench-gpu (jobs/bench_gpu.py): workloads started within BENCH_BUDGET s (default 240), stopped so
#      that PIPELINE_LIMIT s are left for step 3
#   3. the product path (jobs/device_pipeline.py): the demo's summarize and caption jobs on a local Ray with
#      one GPU actor, checked row by row, <= PIPELINE_LIMIT s (default 150); only when .device/ray.tar.xz is
#      there (jobs/device_bundle.sh builds it; the session carries .device)
#   4. jobs/calibrate at the 270m shape (the dry run's first CUDA row), only if 150 s are left
# Everything goes to $OUT/device-session.log when OUT is set (the device machine's return folder), else
# ./device-session.log, without the profiler's USDT noise. Steps 1, 2 and 4 need only torch and transformers.
# BENCH_ARGS adds arguments to both bench commands (on a CPU, to try the script: BENCH_ARGS="--shape tiny").
set -u
cd "$(dirname "$0")/.."
log="${OUT:-.}/device-session.log"
limit=${SESSION_LIMIT:-590}
budget=${BENCH_BUDGET:-240}
pipeline=${PIPELINE_LIMIT:-150}
export PYTHONPATH=.
py=${PYTHON:-python3}
quiet() { grep -v -E "USDT|SyncActivityProfiler" ; }
{
  echo "== $(date -u +%FT%TZ) device session at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  echo "== 1. eager SDPA decode, 8 rows, CUDA_LAUNCH_BLOCKING=1"
  CUDA_LAUNCH_BLOCKING=1 timeout 90 $py -m jobs.bench_gpu --compile off --attention sdpa --rows 8 \
    --workloads summarize --hf-batch 8 ${BENCH_ARGS:-} 2>&1 | quiet
  echo "rc=${PIPESTATUS[0]} after ${SECONDS}s"
  echo "== 2. bench-gpu, workloads started within ${budget}s"
  timeout $((limit - SECONDS - pipeline - 10)) $py -m jobs.bench_gpu --time-budget "$budget" ${BENCH_ARGS:-} 2>&1 \
    | quiet
  echo "rc=${PIPESTATUS[0]} after ${SECONDS}s"
  if [ -f .device/ray.tar.xz ]; then
    echo "== 3. the pipeline on this machine's accelerator (jobs/device_pipeline.py), <= ${pipeline}s"
    site=/tmp/t5g2-device-site
    mkdir -p "$site" && for bundle in .device/*.tar.xz; do tar -xJf "$bundle" -C "$site"; done
    PYTHONPATH="$site:$PYTHONPATH" timeout "$pipeline" $py -m jobs.device_pipeline 2>&1 \
      | grep -E "^(PASS|FAIL|device pipeline|summarize|caption|engine)|Error" | quiet
    echo "rc=${PIPESTATUS[0]} after ${SECONDS}s"
  else
    echo "== 3. pipeline skipped: no .device/ray.tar.xz (bash jobs/device_bundle.sh, then carry .device)"
  fi
  left=$((limit - SECONDS))
  if [ "$left" -gt 150 ]; then
    echo "== 4. calibrate (270m, ${left}s left)"
    timeout $((left - 10)) $py -m jobs.calibrate --shape 270m --rounds 1 --repeats 2 2>&1 | quiet
    echo "rc=${PIPESTATUS[0]} after ${SECONDS}s"
  else
    echo "== 4. calibrate skipped (${left}s left)"
  fi
} 2>&1 | tee "$log"
