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

Bad input (a command-line mistake, a config file that rejects its argument, a config the run
cannot use) ends the command with ONE line on stderr, ``error: <what is wrong; what to do>``,
and exit code 2, before anything is written.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config: configs/<file>.py[:<arg>] (required).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs (required).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
_LOCAL_DEVICES = flags.DEFINE_integer(
    "local_device_count", None, "CPU only: number of CPU devices this process exposes.")

_BAD_INPUT_EXIT_CODE = 2
_CONFIG_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.DOTALL)


# ---------------------------------------------------------------------------- bad input
def _exit_bad_input(message: str) -> None:
    """Ends the command: one line on stderr, exit code 2."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    sys.exit(_BAD_INPUT_EXIT_CODE)


def _message(error: BaseException) -> str:
    """An exception's own message, unwrapped from the exceptions ml_collections wraps
    (AttributeError(KeyError('...')))."""
    while len(error.args) == 1 and isinstance(error.args[0], BaseException):
        error = error.args[0]
    if len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)


def _suggestion(name: str, candidates, prefix: str) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _config_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ConfigDict):
            keys += _config_keys(value, f"{prefix}{key}.")
    return keys


def _config_value(config: ConfigDict, path: str):
    """(True, value) of a dotted key, (False, None) when there is no such key."""
    node = config
    for part in path.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last ``--name=VALUE`` / ``--name VALUE`` of argv (None when absent)."""
    value = None
    for i, arg in enumerate(argv):
        for dashes in ("--", "-"):
            if arg.startswith(f"{dashes}{name}="):
                value = arg.split("=", 1)[1]
            elif arg == f"{dashes}{name}" and i + 1 < len(argv):
                value = argv[i + 1]
    return value


def _load_config_file(spec: str) -> tuple[ConfigDict | None, str | None]:
    """(config, None), or (None, what is wrong) for ``--config=FILE[:ARG]``, loaded the way
    ml_collections does (``get_config(ARG)``); used to explain a failed flag parse."""
    path, has_arg, arg = spec.partition(":")
    if not os.path.isfile(path):
        return None, f"--config={spec}: no such config file {path!r} (give configs/<file>.py[:<arg>])."
    module_spec = importlib.util.spec_from_file_location("_evit_checked_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        config = module.get_config(arg) if has_arg else module.get_config()
    except Exception as e:  # whatever the config file raises is reported, in one line
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                 if os.path.abspath(f.filename) == os.path.abspath(path)]
        where = f"line {lines[-1]}: " if lines else ""
        return None, f"--config={spec}: {where}{type(e).__name__}: {_message(e)}"
    if not isinstance(config, ConfigDict):
        return None, f"--config={spec}: get_config() returned {type(config).__name__}, not a ConfigDict."
    return config, None


def _explain_config(argv: list[str]) -> str | None:
    """What is wrong with --config and its --config.KEY overrides, or None if nothing."""
    spec = _flag_value(argv, "config")
    if not spec:
        return "--config is required, e.g. --config=configs/demo.py:smoke."
    config, problem = _load_config_file(spec)
    if problem:
        return problem
    for arg in argv[1:]:
        match = _CONFIG_OVERRIDE.match(arg)
        if match and not _config_value(config, match.group(1))[0]:
            key = match.group(1)
            return (f"--config.{key}: no such config key" + _suggestion(key, _config_keys(config), "--config.")
                    + " (configs/common.py lists every key).")
    return None


def _explain_flag_error(error: BaseException, argv: list[str]) -> str:
    """One line for a failed flag parse: the config's problem if it has one, else the flag's."""
    problem = _explain_config(argv)
    if problem:
        return problem
    if isinstance(error, flags.UnrecognizedFlagError):
        return f"--{error.flagname}: unknown flag" + _suggestion(error.flagname, flags.FLAGS, "--") + \
            " (--helpshort lists the flags)."
    text = _message(error)
    text = text[len("flag "):] if text.startswith("flag ") else text
    match = _CONFIG_OVERRIDE.match(text.split(":", 1)[0])
    if match:  # a value of the wrong type: say which type the key takes
        config, _ = _load_config_file(_flag_value(argv, "config"))
        found, value = _config_value(config, match.group(1))
        if found and value is not None:
            text += f" (config.{match.group(1)} is of type {type(value).__name__})"
    return text


def _explain_sequence_overrides(argv: list[str], parsed: ConfigDict) -> str | None:
    """ml_collections parses a sequence override element by element, and an element that is
    no literal becomes a string (--config.data.image_sizes=2O0 -> ('2O0',)): compare the
    elements with the config file's default ones."""
    overrides = [m for m in map(_CONFIG_OVERRIDE.match, argv[1:]) if m]
    if not overrides:
        return None
    defaults, problem = _load_config_file(_flag_value(argv, "config"))
    if problem:
        return problem
    for match in overrides:
        found, default = _config_value(defaults, match.group(1))
        if not (found and isinstance(default, (list, tuple)) and default):
            continue
        expected = type(default[0])
        _, value = _config_value(parsed, match.group(1))
        if not isinstance(value, (list, tuple)):
            continue
        numeric = expected is float and all(isinstance(v, (int, float)) for v in value)
        if not numeric and not all(isinstance(v, expected) for v in value):
            return (f"--config.{match.group(1)}={match.group(2)}: expected a sequence of {expected.__name__} "
                    f"(the default is {default!r}), got {tuple(value)!r}.")
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where every mistake is one line on stderr and exit code 2."""
    try:
        remaining = flags.FLAGS(argv)
    except Exception as e:  # absl, ml_collections and the config file raise various types
        _exit_bad_input(_explain_flag_error(e, argv))
    if len(remaining) > 1:
        _exit_bad_input(f"unexpected argument(s) {remaining[1:]}: every option is a --flag=value.")
    if not isinstance(_CONFIG.value, ConfigDict):  # e.g. a config file that could not be read
        _exit_bad_input(_explain_config(argv) or f"--config={_flag_value(argv, 'config')} could not be loaded.")
    problem = _explain_sequence_overrides(argv, _CONFIG.value)
    if problem:
        _exit_bad_input(problem)
    if not _WORKDIR.value:
        _exit_bad_input("--workdir is required: the run's directory for checkpoints, metrics and logs.")
    return remaining


# ---------------------------------------------------------------------------- main
def _quiet_orbax(record) -> bool:
    # Orbax logs every save step at INFO; keep its warnings and errors only.
    return record.levelno >= 30 or "/orbax/" not in record.pathname  # 30: std logging.WARNING


def main(argv):
    del argv  # checked by _parse_flags
    logging.get_absl_logger().addFilter(_quiet_orbax)
    # Before JAX creates its CPU client: a CPU step then reuses its buffers instead of page-faulting
    # them in on every step (evit_jax/host_memory.py).
    from evit_jax import host_memory

    host_memory.retain_freed_memory()
    # Imported here so that flags are parsed (and config errors raised) before jax starts.
    import jax

    from evit_jax.train import distributed, loop

    if _LOCAL_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", int(_LOCAL_DEVICES.value))
    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                     jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
        loop.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:
        # Bad input: one clear line (the traceback only with --verbosity=1).
        logging.vlog(1, "Traceback", exc_info=True)
        _exit_bad_input(str(e))


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
