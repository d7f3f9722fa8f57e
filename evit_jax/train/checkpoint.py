"""Checkpoints: Orbax CheckpointManager for the train state + the grain iterator position,
the workdir's run record (which model/config lives here) and SIGTERM handling.

Layout of a workdir::

    WORKDIR/run_info.json            model name, task and config of the run (process 0)
    WORKDIR/checkpoints/<step>/state the TrainState (sharded arrays, OCDBT)
    WORKDIR/checkpoints/<step>/data  grain iterator state, one JSON per process

Orbax writes every checkpoint into a temporary directory and renames it when complete, so a
crash during a save leaves the previous complete checkpoint untouched; ``latest_step`` only
ever sees complete ones. Restores target an abstract tree of ``jax.ShapeDtypeStruct``
carrying the CURRENT mesh's shardings, so a checkpoint written on 8 devices restores on 2.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

RUN_INFO = "run_info.json"


# ---------------------------------------------------------------------------- run record
def read_run_info(workdir: str) -> dict | None:
    path = os.path.join(workdir, RUN_INFO)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_workdir(workdir: str, model_name: str, task_name: str) -> None:
    """Refuses (one line, before any work) a workdir whose checkpoints belong to another model."""
    info = read_run_info(workdir)
    has_ckpt = latest_complete_step(workdir) is not None
    if info is None:
        if has_ckpt:
            raise ValueError(f"workdir {workdir!r} holds checkpoints but no {RUN_INFO}; "
                             "it was not written by evit_jax.main - use a fresh --workdir.")
        return
    if has_ckpt and (info.get("model") != model_name or info.get("task") != task_name):
        raise ValueError(
            f"workdir {workdir!r} holds a checkpoint of {info.get('task')} model {info.get('model')!r}, "
            f"not {model_name!r}; use another --workdir or --config.model.name={info.get('model')}.")


def write_run_info(workdir: str, model_name: str, task_name: str, config_json: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RUN_INFO)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"model": model_name, "task": task_name, "config": json.loads(config_json)}, f, indent=1)
    os.replace(tmp, path)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def latest_complete_step(workdir: str) -> int | None:
    """Largest step with a finished checkpoint (temporary, unfinished saves are ignored)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    steps = ocp.utils.checkpoint_steps(directory)
    return max(steps) if steps else None


# ---------------------------------------------------------------------------- manager
class Checkpointer:
    """Saves/restores {"state": TrainState, "data": grain iterator} under WORKDIR/checkpoints."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def has_step(self, step: int) -> bool:
        """True when ``step`` is saved or being saved (an async save in flight counts)."""
        return step in self.manager.all_steps()

    def save(self, step: int, state: Any, data_iterator: Any | None, *, force: bool = False) -> bool:
        """Saves ``step`` (asynchronously with ``async_save``); returns whether a save started.

        A step that is already saved is skipped, ``force`` or not: the final or SIGTERM save
        of a step just saved periodically, or of the step a run resumed from, is a no-op, so
        a run stopped at any point can always be started again.
        """
        if self.has_step(step):
            logging.info("Checkpoint of step %d already saved in %s", step, self.directory)
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("Saving checkpoint of step %d to %s (async)", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restores the state onto the shardings carried by ``abstract_state`` and, when the
        process layout matches the saved one, the data iterator in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if self._has_data_state(step):
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                logging.warning("Checkpoint %d has no data-iterator state for %d processes; the data "
                                "order restarts from the seed.", step, jax.process_count())
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def _has_data_state(self, step: int) -> bool:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return os.path.exists(os.path.join(self.directory, str(step), "data", name))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------- preemption
class PreemptionHandler:
    """SIGTERM -> save and stop at a step boundary.

    Single process: a Python SIGTERM handler sets a flag. Several processes: jax's
    preemption sync service (started by jax.distributed.initialize) catches SIGTERM on any
    host and makes every host agree on the same step to stop at.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        self._previous = None
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        logging.warning("SIGTERM received: will save a checkpoint and exit at the next step.")
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()

    def restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
