"""The whole recipe (scheduled drop path, MESA, BatchNorm re-estimation before every evaluation, per-class
metrics, mixup/cutmix) through `evit_jax.main` on `tiny_test_evit` (tests/_train_helpers.py):

- 1 device, 4 devices and 2 processes x 2 devices train alike: the BN re-estimation is over the global
  batch (synchronised across devices and hosts), the MESA teacher and the progress do not depend on the
  layout;
- a run stopped right after the save of a step that also evaluates resumes bit for bit: the re-estimated
  statistics (which the MESA teacher uses afterwards) are in that checkpoint.
"""

import jax
import numpy as np
import pytest

from tests import _train_helpers as h

STEPS = 8


def _recipe(*extra):
    # warmup 2 of 8 steps: progress (t - 2) / 6, MESA from t = 4; evaluations (with re-estimation) at 4 and 8.
    return (f"--config.total_steps={STEPS}", "--config.checkpoint.every_steps=4", "--config.eval_every_steps=4",
            "--config.mix.mixup_alpha=0.5", "--config.mix.cutmix_alpha=0.5", "--config.loss.bce=True",
            "--config.model.drop_path_rate=0.3", "--config.model.drop_path_scheduled=True",
            "--config.mesa.ratio=2.0", "--config.mesa.threshold=0.25",
            "--config.reset_bn.num_images=64", "--config.reset_bn.global_batch_size=16",
            "--config.per_class_metrics=True", *extra)


def _run(workdir, data_dir, devices=1, **kwargs):
    result = h.run_main(workdir, data_dir, *_recipe(), devices=devices, tiny=h.TINY_EVIT, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _close(a, b, rtol):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=rtol, atol=1e-6),
                           a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    work = str(tmp_path_factory.mktemp("ref") / "ref")
    return work, _run(work, data_dir)


def test_one_device_four_devices_and_two_processes_agree(tmp_path, data_dir, reference):
    ref, result = reference
    assert "Re-estimated the BatchNorm statistics of the EMA weights on 4 batches of 16 images" in result.stderr
    four = str(tmp_path / "four")
    _run(four, data_dir, devices=4)

    multi = str(tmp_path / "multi")
    proc, logs = h.run_local_processes(multi, data_dir, str(tmp_path / "logs"), *_recipe(), tiny=h.TINY_EVIT,
                                       timeout=900)
    assert proc.returncode == 0, logs

    m1, m4, m22 = h.read_metrics(ref), h.read_metrics(four), h.read_metrics(multi)
    for step in range(1, STEPS + 1):
        assert m4[step]["train/loss"] == pytest.approx(m1[step]["train/loss"], rel=1e-5), step
        assert m22[step]["train/loss"] == pytest.approx(m4[step]["train/loss"], rel=1e-6), step
    assert m1[STEPS]["train/teacher_loss"] > 0 and m1[2]["train/teacher_loss"] == 0
    for step in (4, STEPS):
        per_class = [k for k in m1[step] if k.startswith("eval_ema/top1/")]
        assert len(per_class) >= 5
        for key in ["eval_ema/top1", "eval_ema/loss", *per_class]:
            assert m4[step][key] == pytest.approx(m1[step][key], rel=1e-4, abs=1e-9), (step, key)
            assert m22[step][key] == pytest.approx(m4[step][key], rel=1e-6, abs=1e-9), (step, key)
    s1, s4, s22 = (h.restore_raw_state(w) for w in (ref, four, multi))
    _close(s1["ema_batch_stats"], s4["ema_batch_stats"], rtol=1e-4)  # the re-estimated statistics
    _close(s4["ema_batch_stats"], s22["ema_batch_stats"], rtol=1e-5)
    _close(s4["params"], s22["params"], rtol=1e-5)


def test_stop_after_the_save_of_an_evaluated_step_resumes_exactly(tmp_path, data_dir, reference):
    ref, _ = reference
    work = str(tmp_path / "stopped")
    stopped = _run(work, data_dir, extra_env={"EVIT_TEST_SIGTERM_AFTER_SAVE": "4"})
    assert "preempted=True" in stopped.stdout and "step=4 " in stopped.stdout, stopped.stdout
    resumed = _run(work, data_dir)
    assert "Resuming from the checkpoint of step 4" in resumed.stderr
    a, b = h.restore_raw_state(ref), h.restore_raw_state(work)
    for key in a:
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=key),
                               a[key], b[key])
    ma, mb = h.read_metrics(ref), h.read_metrics(work)
    for step in range(1, STEPS + 1):
        assert mb[step]["train/loss"] == ma[step]["train/loss"], step
    assert mb[STEPS]["eval_ema/top1"] == ma[STEPS]["eval_ema/top1"]
