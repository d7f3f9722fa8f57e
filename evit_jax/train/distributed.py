"""Multi-process start-up: ``jax.distributed.initialize`` when (and only when) needed.

Order of precedence:
1. explicit ``coordinator_address``/``num_processes``/``process_id`` (main's flags; used by
   ``launch/local.sh`` to run N CPU processes on one machine);
2. a SLURM job step with more than one task (``SLURM_NTASKS`` > 1), or a multi-host Cloud
   TPU slice (``TPU_WORKER_HOSTNAMES`` lists more than one host, or
   ``MEGASCALE_COORDINATOR_ADDRESS`` is set): jax detects the cluster itself;
3. otherwise: a single process, nothing to do.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def detect_cluster(environ: dict | None = None) -> str | None:
    """Name of the multi-process environment we are in ("slurm" | "tpu_pod"), or None."""
    env = os.environ if environ is None else environ
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu_pod"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Starts jax.distributed if this is a multi-process job; idempotent for single processes."""
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id must be given together.")
        logging.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)",
                     coordinator_address, num_processes, process_id)
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=int(num_processes), process_id=int(process_id))
        return
    cluster = detect_cluster()
    if cluster is not None:
        logging.info("Detected a %s multi-process job: jax.distributed.initialize()", cluster)
        jax.distributed.initialize()
