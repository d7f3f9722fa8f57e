#!/usr/bin/env bash
# One short, prepared accelerator check (one GPU, about 8 minutes): the parity tests on the device
# (including tests/test_ops.py, whose float32 cases failed at the default TF32 precision on an H200 and
# now run at 'highest'), then bfloat16 forward and train step of B1 and L1 against timm on the same GPU
# (eager; torch.compile for the B1 forward), with MFU and compile time. Each part has its own time limit
# and its own log in $LOGS, so a slow part costs only itself; the parts run in order of importance.
#
#   LOGS=/tmp/evit_gpu bash launch/gpu_checks.sh          # logs: $LOGS/*.log, summary: $LOGS/summary.txt
#   LOGS=/tmp/evit_gpu RESULT=/some/dir bash ...          # also copies summary.txt + logs.tgz to RESULT
#
# DEADLINE (seconds, default 480) bounds the whole script: a part gets at most what is left (150 s for the
# parity tests, 45 s per forward, 120 s per train step).
# JAX_COMPILATION_CACHE_DIR (default $LOGS/jax_cache) keeps the compiled executables: a second run of the
# script (same jax, same GPU) loads them instead of compiling (the train steps' autotuned compiles took
# more than 90 s on an H200), so nearly all of its time goes to measuring. The printed compile times are
# then cache loads; the first run's are the real compile times.
#
# Needs jax with a GPU backend, flax, optax, orbax, einops, ml_collections, grain, tensorflow_datasets,
# torch (CUDA), timm, pytest, pytest-xdist.
set -u
LOGS=${LOGS:-/tmp/evit_gpu}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-480}
mkdir -p "$LOGS"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$LOGS/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
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
  nproc; ls "$JAX_COMPILATION_CACHE_DIR" 2>/dev/null | wc -l | sed 's/^/compilation cache entries at start: /'; } \
  >"$LOGS/env.log" 2>&1
cat "$LOGS/env.log" >>"$summary"

# 1. Parity on the GPU (JAX on the device at 'highest' matmul precision; the torch reference on the CPU).
part parity 150 $PY -m pytest -q -n 4 -p no:cacheprovider \
  tests/test_ops.py tests/test_parity_timm.py tests/test_seg_parity.py tests/test_layers_parity.py
tail -3 "$LOGS/parity.log" >>"$summary"

forward() {  # forward MODEL eager|compile: bf16 forward, batch 256 at 224 px, against timm on the same GPU
  part "fwd_$1_$2" 45 $PY -m evit_jax.tools.benchmark --model "efficientvit_$1" --batch 256 --res 224 \
    --dtype bfloat16 --iters 20 --compare-timm $([[ $2 == compile ]] && echo --timm-compile)
  grep -E "^(JAX|timm|MFU|compile)" "$LOGS/fwd_$1_$2.log" | sed "s/^/  fwd $1 ($2 timm): /" >>"$summary"
}

train() {  # train MODEL: the training loop's own step, bf16 compute, batch 128 at 224 px, against timm
  # (autocast bf16, eager) on the same GPU; MFU counts 3 x the forward's MACs.
  part "train_$1" 120 $PY -m evit_jax.tools.train_bench --model "efficientvit_$1" --batch 128 --res 224 \
    --steps 20 --warmup 3 --dtype bfloat16 --compare-timm
  grep -E "images/s|MFU|timm:" "$LOGS/train_$1.log" | sed "s/^/  train $1: /" >>"$summary"
}

# 2-4. In order of importance: forward B1 and L1, train step B1 and L1, then B1 against torch.compile.
forward b1 eager
forward l1 eager
train b1
train l1
forward b1 compile
ls "$JAX_COMPILATION_CACHE_DIR" 2>/dev/null | wc -l | sed 's/^/compilation cache entries at end: /' >>"$summary"
cat "$summary"
if [[ -n "${RESULT:-}" ]]; then
  cp "$summary" "$RESULT/" && tar czf "$RESULT/logs.tgz" -C "$LOGS" --exclude=jax_cache .
fi
