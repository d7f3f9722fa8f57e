"""Run configs: every config file builds a config its task accepts (config-only checks, no data),
configs are locked, and the schedule rules."""

import glob
import importlib
import os

import pytest

from evit_jax.tasks import get_task
from evit_jax.tasks.config import base_config, task_keys, tasks
from evit_jax.train import loop, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = {"common", "seg_common"}


def _config_files():
    """(module name, arg) for every runnable config file and each arg it documents as valid."""
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name in _SHARED or name.startswith("_"):
            continue
        module = importlib.import_module(f"configs.{name}")
        args = getattr(module, "VARIANTS", None) or {"imagenet": ("b0", "b1", "b2", "b3", "l1", "l2", "l3")}.get(
            name, ("", "smoke"))
        out += [(name, arg) for arg in args]
    return out


@pytest.mark.parametrize("name,arg", _config_files())
def test_every_config_passes_its_task_config_checks(name, arg):
    """Keys exactly those of its task, model of that task, sizes legal: what setup_experiment checks
    before it touches devices or data."""
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    get_task(config).check_config()


def test_bad_config_args_are_one_clear_error():
    from configs import demo, imagenet

    with pytest.raises(ValueError, match="b9"):
        imagenet.get_config("b9")
    with pytest.raises(ValueError, match="nope"):
        demo.get_config("nope")


def test_configs_are_locked():
    from configs import demo, imagenet

    for c in [imagenet.get_config("b1"), demo.get_config("smoke")] + [base_config(t) for t in tasks()]:
        with pytest.raises(AttributeError):
            c.optim.lrr = 1.0
        with pytest.raises(AttributeError):
            c.unknown_key = 1


def test_each_task_has_its_own_keys_only():
    cls, seg = task_keys("classification"), task_keys("segmentation")
    # What one task reads and the other would ignore is absent from the other's configs.
    assert {"data.rrc_scale_min", "data.eval_crop_ratio", "loss.label_smoothing", "mix.mixup_alpha"} <= cls - seg
    assert {"data.eval_protocol", "data.scale_range", "loss.upsample"} <= seg - cls
    with pytest.raises(ValueError, match="unknown task"):
        base_config("detektion")


def test_peak_lr_rule():
    """Official: init_lr = base_lr x #GPUs at 128 images per GPU == base_lr x global_batch / 128."""
    from configs import imagenet

    b1, l1 = imagenet.get_config("b1"), imagenet.get_config("l1")
    assert optim.peak_learning_rate(b1.optim.base_lr, 16 * 128, b1.optim.lr_reference_batch) == pytest.approx(16 * 2.5e-4)
    assert optim.peak_learning_rate(l1.optim.base_lr, 8 * 128, l1.optim.lr_reference_batch) == pytest.approx(8 * 1.5e-4)


def test_schedule_lengths():
    from configs import imagenet

    c = imagenet.get_config("b1")
    total, warmup = loop.schedule_lengths(c, 1_281_167)
    assert total == round(320 * 1_281_167 / 2048) and warmup == round(20 * 1_281_167 / 2048)
    c.total_steps = 640  # overrides the length; warmup keeps its 20/320 share
    assert loop.schedule_lengths(c, 1_281_167) == (640, 40)
    c.warmup_steps = 5
    assert loop.schedule_lengths(c, 1_281_167) == (640, 5)
    c.warmup_steps = 700
    with pytest.raises(ValueError):
        loop.schedule_lengths(c, 1_281_167)
