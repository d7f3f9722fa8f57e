#!/usr/bin/env bash
# Run N processes of evit_jax.main on this machine as ONE multi-process JAX job (CPU).
#
#   launch/local.sh N [main flags...]
#   DEVICES_PER_PROCESS=2 launch/local.sh 2 --config=configs/demo.py:smoke --workdir=/tmp/mp
#
# Each process gets its own DEVICES_PER_PROCESS CPU devices (default 1) and joins the job via
# --coordinator_address/--num_processes/--process_id (a free localhost port is picked).
# Process 0 writes to this terminal; process i>0 to $LOG_DIR/process_<i>.log.
# Environment: DEVICES_PER_PROCESS, LOG_DIR (default: a new temp dir), PYTHON (default:
# python), EVIT_MAIN (module to run, default evit_jax.main).
# SIGINT/SIGTERM are forwarded to every process (each saves a checkpoint and exits).
# Exit status: 0 if every process succeeded, else the first non-zero status.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N [evit_jax.main flags...]  (N = number of processes)" >&2
  exit 2
fi
N=$1; shift
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
PYTHON=${PYTHON:-python}
EVIT_MAIN=${EVIT_MAIN:-evit_jax.main}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t evit_local.XXXXXX)}
mkdir -p "$LOG_DIR"
cd "$(dirname "$0")/.."

PORT=$("$PYTHON" -c "import portpicker; print(portpicker.pick_unused_port())")
echo "local.sh: $N processes x $DEVICES_PER_PROCESS CPU devices, coordinator 127.0.0.1:$PORT, logs of processes 1.. in $LOG_DIR" >&2

pids=()
forward() { for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < N; i++)); do
  cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
       "$PYTHON" -m "$EVIT_MAIN" "$@"
       --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i")
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again until the child is gone.
  while true; do
    set +e; wait "${pids[$i]}"; rc=$?; set -e
    if kill -0 "${pids[$i]}" 2>/dev/null; then continue; fi
    break
  done
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "local.sh: process $i exited with status $rc (process 0 logs above; others in $LOG_DIR)" >&2
  fi
done
exit $status
