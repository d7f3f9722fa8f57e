"""Train or evaluate: ``python -m evit_jax.main --config=configs/<file>.py:<arg> --workdir=DIR``.

Examples::

    python -m evit_jax.main --config=configs/demo.py --workdir=/tmp/demo
    python -m evit_jax.main --config=configs/imagenet.py:b1 --workdir=gs://bucket/b1 \
        --config.data.data_dir=gs://bucket/tfds
    python -m evit_jax.main --config=configs/imagenet.py:b1 --workdir=/tmp/b1 \
        --config.mode=eval --config.init_from=efficientvit_b1_r224.pt

Any config key can be overridden with ``--config.<key>=<value>``; unknown keys are errors.
Multi-process: jax.distributed is initialised automatically on SLURM and Cloud TPU pods, or
explicitly with --coordinator_address/--num_processes/--process_id (see launch/local.sh).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config: configs/<file>.py[:<arg>].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
_LOCAL_DEVICES = flags.DEFINE_integer(
    "local_device_count", None, "CPU only: number of CPU devices this process exposes.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record) -> bool:
    # Orbax logs every save step at INFO; keep its warnings and errors only.
    return record.levelno >= 30 or "/orbax/" not in record.pathname  # 30: std logging.WARNING


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_logger().addFilter(_quiet_orbax)
    # Imported here so that flags are parsed (and config errors raised) before jax starts.
    import jax

    from evit_jax.train import distributed, loop

    if _LOCAL_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", int(_LOCAL_DEVICES.value))
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
    try:
        loop.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:
        # Bad input: one clear line (the traceback only with --verbosity=1).
        logging.vlog(1, "Traceback", exc_info=True)
        raise SystemExit(f"error: {e}") from None


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
