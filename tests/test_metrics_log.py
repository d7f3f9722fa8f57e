"""Run logging (evit_jax/train/metrics_log.py): images/s and ETA count train time only
(evaluation and checkpoint saving excluded), lr is logged at its current value, and
metrics.jsonl survives a line cut short by a crash."""

import json
import os

import numpy as np
import pytest

from evit_jax.train import metrics_log


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_images_per_s_and_eta_exclude_paused_time():
    clock = FakeClock()
    tp = metrics_log.Throughput(start_step=0, total_steps=100, clock=clock)
    clock.now += 10.0                      # 10 steps of 1 s
    img_s, eta = tp.report(10, global_batch=8)
    assert img_s == pytest.approx(8.0) and eta == pytest.approx(90.0)
    with tp.paused():                      # an evaluation of 50 s ...
        clock.now += 50.0
    clock.now += 2.5                       # ... then 10 steps of 0.5 s,
    with tp.paused():                      # with a checkpoint save of 7 s after the 5th
        clock.now += 7.0
    clock.now += 2.5
    img_s, eta = tp.report(20, global_batch=8)
    assert img_s == pytest.approx(16.0)    # 80 images in 5 s of training, not in 62 s
    assert eta == pytest.approx(80 * 0.5)  # 80 steps left at 0.5 s of train time each
    clock.now += 2.0                       # the paused time does not carry over
    img_s, _ = tp.report(22, global_batch=8)
    assert img_s == pytest.approx(8.0)


def test_paused_time_is_excluded_even_when_the_block_raises():
    clock = FakeClock()
    tp = metrics_log.Throughput(start_step=0, total_steps=10, clock=clock)
    with pytest.raises(RuntimeError):
        with tp.paused():
            clock.now += 30.0
            raise RuntimeError("eval failed")
    clock.now += 1.0
    assert tp.report(1, global_batch=4)[0] == pytest.approx(4.0)


def test_window_summary_means_except_lr_which_is_current():
    window = [{"loss": np.float32(2.0), "lr": np.float32(0.1), "grad_norm": np.float32(1.0)},
              {"loss": np.float32(1.0), "lr": np.float32(0.2), "grad_norm": np.float32(3.0)},
              {"loss": np.float32(0.0), "lr": np.float32(0.3), "grad_norm": np.float32(5.0)}]
    summary = metrics_log.summarize_window(window)
    assert summary == {"train/loss": pytest.approx(1.0), "train/lr": pytest.approx(0.3),
                       "train/grad_norm": pytest.approx(3.0)}
    assert all(type(v) is float for v in summary.values())


def test_read_logged_merges_a_step_and_skips_a_cut_line(tmp_path):
    writer = metrics_log.MetricWriter(str(tmp_path), 10, enable_tensorboard=False, progress_bar=False)
    writer.write(5, {"train/loss": 1.5})
    writer.write(5, {"eval/top1": 50.0})
    writer.write(6, {"train/loss": 1.25})
    writer.close()
    assert metrics_log.read_logged(str(tmp_path), 5) == {"train/loss": 1.5, "eval/top1": 50.0}
    assert metrics_log.read_logged(str(tmp_path), 7) == {}
    assert metrics_log.read_logged(str(tmp_path / "nowhere"), 5) == {}
    # A crash cut the last line short: it is skipped, and the next writer starts a new line.
    path = os.path.join(tmp_path, metrics_log.METRICS_FILE)
    with open(path, "a") as f:
        f.write('{"step": 7, "eval/to')
    assert metrics_log.read_logged(str(tmp_path), 7) == {}
    writer = metrics_log.MetricWriter(str(tmp_path), 10, enable_tensorboard=False, progress_bar=False)
    writer.write(7, {"eval/top1": 75.0})
    writer.close()
    assert metrics_log.read_logged(str(tmp_path), 7) == {"eval/top1": 75.0}
    assert json.loads(open(path).read().splitlines()[-1]) == {"step": 7, "eval/top1": 75.0}
