"""Everything that can be checked from the config and the devices is checked before any dataset
is built or read (issue: a batch that does not divide the devices was reported only after the
whole demo dataset had been generated)."""

import os
import subprocess
import sys

from tests import _train_helpers as h


def test_batch_not_dividing_the_devices_fails_before_the_dataset_is_built(tmp_path):
    data_dir = tmp_path / "fresh_data"
    result = subprocess.run(
        [sys.executable, "-m", "evit_jax.main", "--config=configs/demo.py:smoke", f"--workdir={tmp_path / 'w'}",
         f"--config.data.data_dir={data_dir}", "--config.global_batch_size=7", "--local_device_count=2"],
        cwd=h.REPO, env=h.env_for(1), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    line = h.last_error_line(result)
    assert line.startswith("error:") and "7" in line and "2 devices" in line, line
    assert not os.path.exists(data_dir) or not os.listdir(data_dir), "the dataset was built before the check"
    assert not os.path.exists(tmp_path / "w")


def test_config_checks_need_no_dataset(tmp_path):
    """A wrong image size is reported by the task's config check, with no data_dir at all."""
    from configs import demo
    from evit_jax.tasks import get_task

    config = demo.get_config("smoke")
    config.data.data_dir = str(tmp_path / "nothing_here")
    config.data.image_sizes = [48]
    task = get_task(config)
    try:
        task.check_config()
    except ValueError as e:
        assert "multiple of 32" in str(e)
    else:
        raise AssertionError("image size 48 was accepted")
    assert not os.path.exists(tmp_path / "nothing_here")


def test_partner_blocks_follow_the_devices_or_the_config():
    """Mixup/cutmix partners: one block per device by default; a fixed count must be a multiple of the
    device count that divides the global batch (one line otherwise)."""
    import jax
    import pytest

    from configs import demo
    from evit_jax.train import loop
    from evit_jax.train import mesh as mesh_lib

    config = demo.get_config("smoke")
    mesh = mesh_lib.create_mesh("replicated", devices=jax.devices()[:1])
    assert loop.partner_blocks(config, mesh) == 1
    config.global_batch_size = 16
    config.mix.partner_blocks = 4
    assert loop.partner_blocks(config, mesh) == 4
    config.mix.partner_blocks = 3
    with pytest.raises(ValueError, match="mix.partner_blocks=3 must be a multiple of the 1 devices that divides"):
        loop.partner_blocks(config, mesh)
