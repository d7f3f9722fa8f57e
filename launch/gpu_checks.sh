#!/usr/bin/env bash
# One short, prepared accelerator check (GPU): the parity tests on the device, then the bfloat16
# benchmarks (forward of every classification model against timm on the same GPU, segmentation
# forward at 512x512 and 1024x2048, one train step against timm). Each part has its own time
# limit and its own log in $LOGS, so a slow part costs only itself.
#
#   LOGS=/tmp/evit_gpu bash launch/gpu_checks.sh          # logs: $LOGS/*.log, summary: $LOGS/summary.txt
#   LOGS=/tmp/evit_gpu RESULT=/some/dir bash ...          # also copies summary.txt + logs.tgz to RESULT
#
# DEADLINE (seconds, default 1500) bounds the whole script: a part gets at most what is left, and the
# parts run in order of importance (parity, classification forward, segmentation, train step).
#
# Needs jax with a GPU backend, flax, optax, orbax, einops, ml_collections, grain, tensorflow_datasets,
# torch (CUDA), timm, pytest. On an H200 (2026-11-28) the XLA compile of a forward took 15-18 s and the
# train step of B1 at batch 128 more than 90 s (autotuning), hence the limits below.
set -u
LOGS=${LOGS:-/tmp/evit_gpu}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-1500}
mkdir -p "$LOGS"
# Several pytest workers share the GPU: allocate on demand instead of 75% of memory each.
export HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
summary="$LOGS/summary.txt"
: >"$summary"

part() {  # part NAME SECONDS CMD...: run CMD under a time limit, log to $LOGS/NAME.log, record rc
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  if ((left < 15)); then echo "$name skipped: deadline" | tee -a "$summary"; return; fi
  ((limit > left)) && limit=$left
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${SECONDS}s-total $((SECONDS - t0))s" | tee -a "$summary"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import jax, flax, torch, timm; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'timm', timm.__version__, jax.devices())"
  nproc; } >"$LOGS/env.log" 2>&1
cat "$LOGS/env.log" >>"$summary"

# 1. Parity on the GPU (JAX on the device at 'highest' matmul precision; the torch reference on the CPU).
part parity 200 $PY -m pytest -q -n 4 -p no:cacheprovider \
  tests/test_parity_timm.py tests/test_seg_parity.py tests/test_layers_parity.py tests/test_ops.py
tail -3 "$LOGS/parity.log" >>"$summary"

# 2. Forward, bfloat16, batch 256 at 224 px, timm on the same GPU (eager, channels_last).
for m in b0 b1 b2 b3 l1 l2 l3; do
  part "fwd_$m" 90 $PY -m evit_jax.benchmark --model "efficientvit_$m" --batch 256 --res 224 \
    --dtype bfloat16 --iters 20 --compare-timm
  grep -E "^(JAX|timm|MFU|compile)" "$LOGS/fwd_$m.log" | sed "s/^/  $m: /" >>"$summary"
done

# 3. Segmentation forward, bfloat16 (and float32 for B1 at 1024x2048), batch 1.
for args in "b0 512x512 bfloat16" "b1 512x512 bfloat16" "b0 1024x2048 bfloat16" "b1 1024x2048 bfloat16" \
            "b1 1024x2048 float32"; do
  set -- $args
  part "seg_$1_$2_$3" 60 $PY -m evit_jax.benchmark --model "efficientvit_seg_$1_cityscapes" --batch 1 \
    --res "$2" --dtype "$3" --iters 20
  grep -E "^(JAX|MFU)" "$LOGS/seg_$1_$2_$3.log" | sed "s/^/  seg $1 $2 $3: /" >>"$summary"
done

# 4. Train step, B1 at 224, batch 128, bfloat16 compute, against timm (autocast bf16) on the same GPU.
part train_b1 240 $PY -m evit_jax.train.bench --model efficientvit_b1 --batch 128 --res 224 --steps 20 \
  --warmup 3 --dtype bfloat16 --compare-timm
grep -E "images/s" "$LOGS/train_b1.log" | sed "s/^/  train: /" >>"$summary"
cat "$summary"
if [[ -n "${RESULT:-}" ]]; then
  cp "$summary" "$RESULT/" && tar czf "$RESULT/logs.tgz" -C "$LOGS" .
fi
