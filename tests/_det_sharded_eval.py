"""Run with 4 CPU devices (tests/test_detection_task.py): the detection evaluation of the same random
weights on 1 device and on 4 devices (the batch sharded), each writing the eval records finalize_eval
receives (OUT/records_<devices>.npz) and its metrics (OUT/metrics_<devices>.json).

    python -m tests._det_sharded_eval DATA_DIR OUT
"""

import json
import os
import sys

import jax
import numpy as np

from tests._train_helpers import TINY_DET, register_tiny_model

register_tiny_model()
from configs import demo_det  # noqa: E402
from evit_jax.models.random_weights import random_variables  # noqa: E402
from evit_jax.train import loop  # noqa: E402


def evaluate(devices, data_dir: str, out: str) -> None:
    config = demo_det.get_config("smoke")
    config.data.data_dir = data_dir
    config.model.name = TINY_DET
    config.eval_batch_size = 12            # 32 images: 3 batches, the last one padded
    experiment = loop.setup_experiment(config, devices=devices)
    state = experiment.init_state()
    # Random weights whose scores spread over (0, 1): many detections per image, no ties.
    variables = random_variables(experiment.model, (1, 64, 64, 3), seed=3)
    state = state.replace(params=jax.device_put(variables["params"], experiment.state_shardings.params),
                          batch_stats=jax.device_put(variables["batch_stats"], experiment.state_shardings.batch_stats))
    task = experiment.task
    finalize = task.finalize_eval
    seen = []
    task.finalize_eval = lambda sums, records: seen.append(records) or finalize(sums, records)
    metrics = loop.evaluate(experiment, state, include_ema=False)
    (records,) = seen
    n = len(devices)
    np.savez(os.path.join(out, f"records_{n}.npz"), **records)
    with open(os.path.join(out, f"metrics_{n}.json"), "w") as f:
        json.dump(metrics, f)


def main() -> None:
    data_dir, out = sys.argv[1:3]
    devices = jax.devices()
    assert len(devices) == 4, devices
    evaluate(devices[:1], data_dir, out)
    evaluate(devices, data_dir, out)


if __name__ == "__main__":
    main()
