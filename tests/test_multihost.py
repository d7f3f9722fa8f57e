"""N processes x M devices: 2 local processes x 2 CPU devices (launch/local.sh) train exactly
like 1 process x 4 devices on the same global batch; a checkpoint written on 8 devices
restores (and continues) on 2."""

import jax
import numpy as np
import pytest

from tests import _train_helpers as h

STEPS = 4


def _common(*extra):
    # Mixup/cutmix on: its random pairing must not depend on the process layout.
    return (f"--config.total_steps={STEPS}", "--config.mix.mixup_alpha=0.5",
            "--config.mix.cutmix_alpha=0.5", "--config.checkpoint.every_steps=2", *extra)


def test_two_processes_match_one_process(tmp_path, data_dir):
    single = str(tmp_path / "single")
    result = h.run_main(single, data_dir, *_common(), devices=4)
    assert result.returncode == 0, result.stderr[-3000:]

    multi = str(tmp_path / "multi")
    proc, logs = h.run_local_processes(multi, data_dir, str(tmp_path / "logs"), *_common())
    assert proc.returncode == 0, logs
    assert "JAX process 0/2, 2 local / 4 global devices" in proc.stderr, logs

    a, b = h.read_metrics(single), h.read_metrics(multi)
    for step in range(1, STEPS + 1):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6), step
    # Exact global eval counts over both processes' shards (70 examples in evit_shapes/tiny).
    assert b[STEPS]["eval/num_examples"] == a[STEPS]["eval/num_examples"] == 70
    assert b[STEPS]["eval/top1"] == pytest.approx(a[STEPS]["eval/top1"], abs=1e-9)
    sa, sb = h.restore_raw_state(single), h.restore_raw_state(multi)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7),
                           sa["params"], sb["params"])


def test_checkpoint_from_8_devices_restores_on_2(tmp_path, data_dir):
    work = str(tmp_path / "w")
    result = h.run_main(work, data_dir, *_common("--config.total_steps=2", "--config.sharding.strategy=fsdp"), devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = h.read_metrics(work)[2]
    # Evaluate the 8-device checkpoint on 2 devices: same weights, same metrics.
    result = h.run_main(work, data_dir, *_common("--config.total_steps=2", "--config.mode=eval"), devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Evaluating the checkpoint of step 2" in result.stderr
    evaluated = h.read_metrics(work)[2]
    assert evaluated["eval/top1"] == pytest.approx(trained["eval/top1"], abs=1e-9)
    assert evaluated["eval/loss"] == pytest.approx(trained["eval/loss"], rel=1e-5)
    assert evaluated["eval_ema/loss"] == pytest.approx(trained["eval_ema/loss"], rel=1e-5)
    # ... and training continues from it on 2 devices (fsdp over 2).
    result = h.run_main(work, data_dir, *_common("--config.sharding.strategy=fsdp"), devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from the checkpoint of step 2" in result.stderr
    assert int(h.restore_raw_state(work)["step"]) == STEPS
