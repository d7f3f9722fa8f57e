"""Test scaffolding for the training system: a tiny stand-in classifier (compiles in about a
second, unlike EfficientViT) and helpers to run `evit_jax.main` in subprocesses.

The tiny model is reachable under the name ``tiny_test_cnn`` once :func:`register_tiny_model`
has run (tests/_train_main.py does it in subprocesses). Its classifier lives at
``head/op_list_3/linear`` like EfficientViT's ClsHead, and it has BatchNorm ("norm") and
dropout, so every code path of the loop (batch stats, EMA, weight-decay mask, dropout rng)
is exercised. ``tiny_test_evit`` (registered with it) is built from EfficientViT's own layers
(`evit_jax.models.layers`: ConvLayer with its BatchNorm, a residual block with DropPath at the
config's drop_path_rate), for the parts of the recipe that live in those layers (scheduled drop
path, BatchNorm re-estimation). ``tiny_test_det`` is a detector with EfficientViT-Det's output layout
(its PAFPN and YOLOX head on a five-conv stand-in backbone), for the detection task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "tiny_test_cnn"


def _tiny_module():
    import flax.linen as nn
    import jax.numpy as jnp

    class _Linear(nn.Module):
        features: int
        dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.features, dtype=self.dtype, name="linear")(x)

    class _Head(nn.Module):
        num_classes: int
        dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x, train):
            x = nn.Dropout(0.1, deterministic=not train)(x)
            return _Linear(self.num_classes, self.dtype, name="op_list_3")(x)

    class TinyClassifier(nn.Module):
        num_classes: int = 10
        dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x, train: bool = False):
            for i, width in enumerate((8, 16)):
                x = nn.Conv(width, (3, 3), strides=2, use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype, name=f"norm{i}")(x)
                x = nn.relu(x)
            x = x.mean(axis=(1, 2))
            return _Head(self.num_classes, self.dtype, name="head")(x, train).astype(jnp.float32)

    return TinyClassifier


def _tiny_evit_module():
    import dataclasses

    import flax.linen as nn
    import jax.numpy as jnp

    from evit_jax.models import layers

    class _Head(nn.Module):
        num_classes: int
        cfg: layers.LayerConfig

        @nn.compact
        def __call__(self, x, train):
            return layers.LinearLayer(self.num_classes, self.cfg, name="op_list_3")(x, train)

    class TinyEvit(nn.Module):
        """stem ConvLayer (BN, relu) -> x + DropPath(ConvLayer(BN)) -> mean -> linear."""
        num_classes: int
        cfg: layers.LayerConfig
        drop_path_rate: float = 0.0

        @nn.compact
        def __call__(self, x, train: bool = False):
            cfg = self.cfg
            x = layers.ConvLayer(8, 3, cfg, stride=2, act="relu", name="stem")(x, train)
            x = layers.make_residual(layers.ConvLayer, True, self.drop_path_rate, name="res", features=8,
                                     kernel_size=3, cfg=cfg)(x, train)
            x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            return _Head(self.num_classes, cfg, name="head")(x, train).astype(jnp.float32)

    def build(options):
        return TinyEvit(options.classes(), dataclasses.replace(options.cfg, conv_impl="lax"), options.drop_path_rate)

    return build


def _tiny_det_module():
    import dataclasses

    import flax.linen as nn

    from evit_jax.models import det, layers

    class TinyDetector(nn.Module):
        """Five stride-2 ConvLayers (strides 2..32; the last three are P2-P4 at 8, 16, 32) -> EfficientViT-Det's
        own PAFPN and YOLOX head at widths 8/16/32: the detector's output layout, compiled in seconds."""
        num_classes: int
        cfg: layers.LayerConfig

        @nn.compact
        def __call__(self, x, train: bool = False):
            features = []
            for i, width in enumerate((8, 8, 8, 16, 32)):
                x = layers.ConvLayer(width, 3, self.cfg, stride=2, act="relu", name=f"down_{i}")(x, train)
                features.append(x)
            levels = det.YOLOPAFPN((8, 16, 32), 1, self.cfg, name="neck")(features[2:], train)
            return det.YOLOXHead(self.num_classes, 8, self.cfg, name="head")(levels, train).astype("float32")

    return lambda options: TinyDetector(options.classes(), dataclasses.replace(options.cfg, conv_impl="lax"))


TINY_EVIT = "tiny_test_evit"
TINY_DET = "tiny_test_det"


def register_tiny_model() -> None:
    """Adds the models ``tiny_test_cnn`` and ``tiny_test_evit`` (10-class classifiers by default) and
    ``tiny_test_det`` (a detector, 6 classes by default) to the zoo."""
    from evit_jax.models import ModelSpec, register_model

    tiny_cls = _tiny_module()
    register_model(ModelSpec(TINY, "classification", "tiny", 10),
                   lambda options: tiny_cls(num_classes=options.classes(), dtype=options.cfg.dtype))
    register_model(ModelSpec(TINY_EVIT, "classification", "tiny", 10), _tiny_evit_module())
    register_model(ModelSpec(TINY_DET, "detection", "tiny", 6), _tiny_det_module())


def example_records(outputs, targets, batch) -> dict:
    """Per-example eval records for tests of Task.eval_records on a classifier: the predicted
    class, the label and the image's pixel sum (which identifies the example)."""
    import jax.numpy as jnp

    return {"pred": jnp.argmax(outputs, axis=-1).astype(jnp.int32), "label": batch["label"],
            "pixel_sum": jnp.sum(batch["image"].astype(jnp.int32), axis=(1, 2, 3))}


def record_classification_eval(out_dir: str) -> None:
    """Makes the classification task return :func:`example_records` and save the records of
    every evaluation, as seen by finalize_eval, to OUT_DIR/records_p<process>_<n>.npz."""
    import jax
    import numpy as np

    from evit_jax.tasks.classification import ClassificationTask

    finalize = ClassificationTask.finalize_eval
    calls = []

    def finalize_eval(self, sums, records=None):
        np.savez(os.path.join(out_dir, f"records_p{jax.process_index()}_{len(calls)}.npz"), **records)
        calls.append(1)
        return finalize(self, sums, records)

    ClassificationTask.eval_records = lambda self, outputs, targets, batch: example_records(outputs, targets, batch)
    ClassificationTask.finalize_eval = finalize_eval


def env_for(devices: int = 1, **extra: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def main_command(workdir: str, data_dir: str, *overrides: str, config: str = "configs/demo.py:smoke",
                 tiny: bool | str = True) -> list[str]:
    """``tiny``: True (``tiny_test_cnn``), a registered test model's name, or False (the config's model,
    through ``evit_jax.main`` itself)."""
    module = "tests._train_main" if tiny else "evit_jax.main"
    args = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}"]
    if tiny:
        args.append(f"--config.model.name={TINY if tiny is True else tiny}")
    return args + list(overrides)


def run_main(workdir: str, data_dir: str, *overrides: str, devices: int = 1, tiny: bool | str = True,
             config: str = "configs/demo.py:smoke", timeout: float = 300,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(workdir, data_dir, *overrides, config=config, tiny=tiny),
                          cwd=REPO, env=env_for(devices, **(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)


def run_local_processes(workdir: str, data_dir: str, log_dir: str, *overrides: str, processes: int = 2,
                        devices_per_process: int = 2, tiny: bool | str = True, config: str = "configs/demo.py:smoke",
                        timeout: float = 600) -> tuple[subprocess.CompletedProcess, str]:
    """``launch/local.sh`` running the training command on ``processes`` local processes with
    ``devices_per_process`` CPU devices each; (completed launcher, its stderr tail + every
    process's log tail, for assertion messages)."""
    # PYTHON: the launcher runs this interpreter, also when its venv is not activated.
    env = env_for(1, DEVICES_PER_PROCESS=str(devices_per_process), EVIT_MAIN="tests._train_main", LOG_DIR=log_dir,
                  PYTHON=sys.executable)
    env.pop("XLA_FLAGS")
    cmd = [os.path.join(REPO, "launch", "local.sh"), str(processes),
           *main_command(workdir, data_dir, *overrides, config=config, tiny=tiny)[3:]]  # drop "python -m ..."
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    logs = proc.stderr[-3000:] + ("".join(open(os.path.join(log_dir, f)).read()[-2000:]
                                          for f in sorted(os.listdir(log_dir))) if os.path.isdir(log_dir) else "")
    return proc, logs


def wait_for_step(workdir: str, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Returns once the running ``proc`` has logged ``step`` to WORKDIR/metrics.jsonl (AssertionError if
    it ends or times out first)."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stderr.read()[-3000:]}")
        if os.path.exists(path) and any(f'"step": {step},' in line for line in open(path)):
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def assert_trees_equal(a, b) -> None:
    """Same paths, bitwise equal leaves."""
    import jax
    import numpy as np

    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def final_line(result: subprocess.CompletedProcess) -> str:
    """The run's FINAL summary line without its wall time (which differs from run to run)."""
    (line,) = [l for l in result.stdout.splitlines() if l.startswith("FINAL ")]
    return " ".join(part for part in line.split() if not part.startswith("wall_s="))


def read_metrics(workdir: str) -> dict[int, dict]:
    """metrics.jsonl as {step: merged metrics}, later lines winning (a resumed run re-logs);
    a line cut short by a killed run is skipped, as the loop does."""
    out: dict[int, dict] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault(record["step"], {}).update(record)
    return out


def restore_raw_state(workdir: str, step: int | None = None) -> dict:
    """The saved TrainState of a workdir as host numpy arrays (whatever devices saved it)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    with ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as manager:
        step = manager.latest_step() if step is None else step
        meta = manager.item_metadata(step)["state"]
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=args)))
    return restored["state"]


def last_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""
