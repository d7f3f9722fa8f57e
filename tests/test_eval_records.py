"""Evaluation on the device (evit_jax/train/loop.py `evaluate`, evit_jax/train/exact_sum.py):
statistics summed exactly on the device, and per-example records (Task.eval_records) gathered
for the real examples in dataset order, the same on 1 device, 4 devices and 2 processes x 2
devices."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import _train_helpers as h

EVAL_EXAMPLES = 70  # the test split of evit_shapes/tiny


# ---------------------------------------------------------------------------- exact sums
def _device_sum(batches: list[dict]) -> dict:
    from evit_jax.train import exact_sum

    start, add = jax.jit(exact_sum.start), jax.jit(exact_sum.add)
    acc = None
    for stats in batches:
        acc = start(stats) if acc is None else add(acc, stats)
    return exact_sum.to_host(jax.device_get(acc))


def test_long_sums_of_counts_stay_exact():
    rng = np.random.default_rng(0)
    n = 300
    counts = rng.integers(10_000_000, 20_000_000, size=(n, 5), dtype=np.int32)   # total > 2**31
    odd = (2 * rng.integers(50_000, 100_000, size=(n, 5)) + 1).astype(np.float32)  # total > 2**24
    flags = rng.integers(0, 2, size=(n,)).astype(bool)
    got = _device_sum([{"count": c, "float_count": f, "flag": b} for c, f, b in zip(counts, odd, flags)])
    assert got["count"].dtype == np.int64 and got["float_count"].dtype == np.float64
    np.testing.assert_array_equal(got["count"], counts.astype(np.int64).sum(0))
    assert counts.astype(np.int64).sum(0).min() > 2**31               # an int32 sum would overflow
    exact = odd.astype(np.int64).sum(0)
    np.testing.assert_array_equal(got["float_count"], exact.astype(np.float64))
    naive = np.zeros(5, np.float32)
    for f in odd:
        naive = naive + f
    assert np.any(naive.astype(np.int64) != exact)                    # a float32 running sum is not exact
    assert int(got["flag"]) == int(flags.sum())


def test_long_float_sums_are_compensated():
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 1000, size=(400, 3)).astype(np.float32)
    got = _device_sum([{"loss_sum": v, "negative": -v} for v in values])
    for j in range(3):
        exact = math.fsum(float(v) for v in values[:, j])
        assert got["loss_sum"][j] == pytest.approx(exact, rel=1e-12)
        assert got["negative"][j] == pytest.approx(-exact, rel=1e-12)


def test_negative_and_unsigned_integers():
    values = [{"delta": np.array([-(2**31) + 5, 7, -1], np.int32), "u": np.array([2**32 - 1, 0, 3], np.uint32)}
              for _ in range(9)]
    got = _device_sum(values)
    np.testing.assert_array_equal(got["delta"], 9 * np.array([-(2**31) + 5, 7, -1], np.int64))
    np.testing.assert_array_equal(got["u"], 9 * np.array([2**32 - 1, 0, 3], np.int64))


# ---------------------------------------------------------------------------- records
def _config(data_dir: str):
    from configs import demo

    config = demo.get_config("smoke")
    config.data.data_dir = data_dir
    config.model.name = h.TINY
    config.eval_batch_size = 32          # 70 examples: 3 batches, 26 padding examples in the last
    return config


@pytest.fixture(scope="module")
def one_device(data_dir):
    """(experiment, state, records of both weight sets, metrics) of an in-process evaluation on
    one device, the classification task recording `_train_helpers.example_records`."""
    from evit_jax.train import loop

    h.register_tiny_model()
    experiment = loop.setup_experiment(_config(data_dir), devices=jax.devices()[:1])
    state = experiment.init_state()
    task = experiment.task
    seen = []
    finalize = task.finalize_eval
    task.eval_records = h.example_records
    task.finalize_eval = lambda sums, records: seen.append(records) or finalize(sums, records)
    metrics = loop.evaluate(experiment, state, include_ema=True)
    return experiment, state, seen, metrics


def test_records_hold_every_real_example_in_dataset_order(one_device, data_dir):
    from evit_jax.data import sources, transforms
    from evit_jax.data.transforms import normalize_images
    from evit_jax.train.state import model_variables

    experiment, state, seen, metrics = one_device
    assert len(seen) == 2  # raw and EMA weights
    d = experiment.config.data
    source = sources.get_source(d.name, d.eval_split, data_dir)
    transform = transforms.ClassificationEvalTransform(size=int(d.eval_image_size), crop_ratio=float(d.eval_crop_ratio),
                                                       image_key=experiment.task.info.image_key,
                                                       label_key=experiment.task.info.label_key)
    examples = [transform(source[i]) for i in range(len(source))]
    assert len(examples) == EVAL_EXAMPLES
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    for name, records in zip(("eval", "eval_ema"), seen):
        assert set(records) == {"pred", "label", "pixel_sum"}
        np.testing.assert_array_equal(records["label"], labels)                        # padding dropped, order kept
        np.testing.assert_array_equal(records["pixel_sum"], images.astype(np.int64).sum(axis=(1, 2, 3)))
        variables = model_variables(state, use_ema=name == "eval_ema")
        logits = jax.jit(lambda v, x: experiment.model.apply(v, normalize_images(x), train=False))(variables, images)
        np.testing.assert_array_equal(records["pred"], np.argmax(np.asarray(logits), -1))  # the model's own outputs
        # The records and the summed statistics describe the same evaluation.
        assert metrics[f"{name}/num_examples"] == EVAL_EXAMPLES
        assert metrics[f"{name}/top1"] == pytest.approx(100.0 * np.mean(records["pred"] == labels), abs=1e-9)


def _fresh_experiment(data_dir):
    from evit_jax.train import loop

    h.register_tiny_model()
    experiment = loop.setup_experiment(_config(data_dir), devices=jax.devices()[:1])
    seen = []
    finalize = experiment.task.finalize_eval
    experiment.task.finalize_eval = lambda sums, records: seen.append(records) or finalize(sums, records)
    return experiment, seen


def test_records_must_have_the_batch_as_leading_axis(data_dir):
    from evit_jax.train import loop

    experiment, _ = _fresh_experiment(data_dir)
    experiment.task.eval_records = lambda outputs, targets, batch: {"mean_logit": jnp.mean(outputs)}
    with pytest.raises(ValueError, match="leading axis is the global eval batch"):
        loop.evaluate(experiment, experiment.init_state(), include_ema=False)


def test_tasks_without_records_get_none_fetched(data_dir):
    from evit_jax.train import loop

    experiment, seen = _fresh_experiment(data_dir)
    loop.evaluate(experiment, experiment.init_state(), include_ema=False)
    assert seen == [{}]


def _records(directory) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("records_"):
            with np.load(os.path.join(directory, name)) as z:
                out[name] = {k: z[k] for k in z.files}
    return out


def test_records_are_the_same_on_1_device_4_devices_and_2_processes(tmp_path, data_dir):
    # A 1-step run on 1 device records its final evaluation; its checkpoint is then evaluated
    # (--config.mode=eval) on 4 devices and on 2 processes x 2 devices, with the classification
    # task recording per-example outputs (tests/_train_main.py).
    work = str(tmp_path / "w")
    overrides = ("--config.total_steps=1", "--config.warmup_steps=0", "--config.eval_batch_size=32",
                 "--config.eval_ema=False")
    layouts = {}
    for devices, mode in ((1, "train"), (4, "eval")):
        out = tmp_path / f"records_1x{devices}"
        out.mkdir()
        result = h.run_main(work, data_dir, *overrides, f"--config.mode={mode}", devices=devices,
                            extra_env={"EVIT_TEST_EVAL_RECORDS": str(out)})
        assert result.returncode == 0, result.stderr[-3000:]
        layouts[f"1x{devices}"] = _records(out)
    out = tmp_path / "records_2x2"
    out.mkdir()
    env = h.env_for(1, DEVICES_PER_PROCESS="2", EVIT_MAIN="tests._train_main", LOG_DIR=str(tmp_path / "logs"),
                    PYTHON=sys.executable, EVIT_TEST_EVAL_RECORDS=str(out))
    env.pop("XLA_FLAGS")
    cmd = [os.path.join(h.REPO, "launch", "local.sh"), "2",
           *h.main_command(work, data_dir, *overrides, "--config.mode=eval")[3:]]
    proc = subprocess.run(cmd, cwd=h.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layouts["2x2"] = _records(out)

    assert list(layouts["1x1"]) == ["records_p0_0.npz"]
    reference = layouts["1x1"]["records_p0_0.npz"]
    assert len(reference["label"]) == EVAL_EXAMPLES
    assert list(layouts["1x4"]) == ["records_p0_0.npz"]
    assert list(layouts["2x2"]) == ["records_p0_0.npz", "records_p1_0.npz"]  # every process has them all
    for layout, files in layouts.items():
        for name, records in files.items():
            for key in ("pred", "label", "pixel_sum"):
                np.testing.assert_array_equal(records[key], reference[key], err_msg=f"{layout} {name} {key}")
