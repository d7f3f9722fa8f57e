#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it, install evit_jax on every worker, run
# evit_jax.main on all workers at once (jax.distributed auto-detects the pod), fetch the
# logs, delete the slice.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE [evit_jax.main flags...]
#   launch/tpu_pod.sh evit-b1 us-central2-b v4-32 --config=configs/imagenet.py:b1 \
#       --workdir=gs://BUCKET/evit/b1 --config.data.data_dir=gs://BUCKET/tfds
#
# Environment: PROJECT (gcloud project; default: the gcloud config), RUNTIME (TPU software
# version, default tpu-ubuntu2204-base), KEEP=1 (do not delete the slice at the end),
# SPOT=1 (spot capacity: preemption sends SIGTERM, the run saves and a rerun resumes),
# REPO_URL (git URL to install from; default: this checkout is copied with scp).
# The workdir and data_dir must be on GCS (every worker reads and writes them).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE [evit_jax.main flags...]" >&2
  exit 2
fi
NAME=$1 ZONE=$2 TYPE=$3; shift 3
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LOGS="$ROOT/tpu_logs/$NAME"
mkdir -p "$LOGS"
tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" $PROJECT_FLAG; }
on_all() { tpu ssh "$NAME" --worker=all --command="$1"; }

cleanup() {
  if [[ "${KEEP:-0}" != "1" ]]; then
    echo "deleting $NAME" >&2
    tpu delete "$NAME" --quiet || true
  fi
}

echo "creating $TYPE slice $NAME in $ZONE" >&2
tpu create "$NAME" --accelerator-type="$TYPE" --version="$RUNTIME" ${SPOT:+--spot}
trap cleanup EXIT

echo "installing on every worker" >&2
if [[ -n "${REPO_URL:-}" ]]; then
  on_all "git clone --depth 1 $REPO_URL evit_jax"
else
  tar -C "$ROOT" --exclude=.venv --exclude=.git --exclude=tpu_logs -czf /tmp/evit_jax_src.tgz .
  tpu scp /tmp/evit_jax_src.tgz "$NAME":~/ --worker=all
  on_all "mkdir -p evit_jax && tar -C evit_jax -xzf evit_jax_src.tgz"
fi
on_all "cd evit_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip \
  && pip install -q -r requirements.txt && pip install -q -U 'jax[tpu]==0.10.2' \
     -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

echo "training on all workers" >&2
ARGS=$(printf ' %q' "$@")
set +e
on_all "cd evit_jax && . .venv/bin/activate && python -m evit_jax.main $ARGS 2>&1 | tee ~/train.log"
status=$?
set -e

echo "fetching logs into $LOGS" >&2
for ((w = 0; w < 256; w++)); do
  tpu scp "$NAME":~/train.log "$LOGS/worker_$w.log" --worker="$w" 2>/dev/null || break
done
exit $status
