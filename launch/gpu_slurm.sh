#!/usr/bin/env bash
# SLURM batch script: one task per GPU node (each task drives all GPUs of its node);
# jax.distributed auto-detects the job from the SLURM_* variables.
#
#   sbatch --nodes=2 launch/gpu_slurm.sh --config=configs/imagenet.py:b1 \
#       --workdir=/shared/evit/b1 --config.data.data_dir=/shared/tfds
#
# Requeue-safe: on preemption SLURM sends SIGTERM (--signal below gives 120 s), every
# process saves a checkpoint at the same step and exits; the requeued job resumes from it.
# Environment: VENV (default: ./.venv with `pip install -r requirements.txt "jax[cuda12]==0.10.2"`).
#SBATCH --job-name=evit_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=72:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

ROOT=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$ROOT"
. "${VENV:-$ROOT/.venv}/bin/activate"
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes, ${SLURM_GPUS_PER_NODE:-?} GPUs per node" >&2

# One process per node; `exec` lets srun deliver SIGTERM straight to python.
srun --kill-on-bad-exit=1 bash -c 'exec python -m evit_jax.main "$@"' _ "$@"
