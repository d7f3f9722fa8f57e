"""Detection throughput: the training loop's own detection train step and eval step on random data.

    python -m evit_jax.tools.det_bench --model efficientvit_det_b1 --batch 8 --res 640

Both steps are the loop's (`evit_jax.train.loop.setup_experiment` on the model's COCO recipe,
configs/coco.py, with random uint8 images instead of a dataset):

* train: normalisation, forward, YOLOX loss with SimOTA over ``--max-boxes`` padded boxes per image
  (``--boxes`` real ones, COCO averages 7.3), backward, SGD with Nesterov momentum and the
  weight-decay mask, EMA of params and BN statistics; the L1 term is off (YOLOX's first epochs);
* eval: normalisation, forward, post-processing (decode, score threshold, class-aware NMS over the
  ``pre_nms_top_k`` best points, top ``max_detections``), with the COCO config's settings. The
  weights are random with spread scores (`evit_jax.models.random_weights`), so that hundreds of
  points pass the threshold and NMS does its full work (a trained detector keeps fewer).

One device; timed in alternating phases (`evit_jax.tools.benchmark.time_in_phases`). Prints
images/s; nothing is asserted (not a test).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from evit_jax.models import get_model_spec

COCO_CLASSES = 80


def bench_config(model_name: str, batch: int, res: int, *, max_boxes: int = 120, conv_impl: str = "auto"):
    """configs/coco.py's recipe for `model_name` (a det model of the zoo) at one square size, batch `batch`
    for both steps."""
    from configs import coco

    spec = get_model_spec(model_name)  # unknown name -> ValueError before any work
    if spec.task != "detection":
        raise ValueError(f"{spec.name} is a {spec.task} model; det_bench takes a detection model "
                         "(efficientvit_det_*, efficientvit_v1_det_*).")
    variant = spec.name.replace("efficientvit_", "").replace("det_", "")   # b1, v1_b1
    config = coco.get_config(variant)
    config.model.num_classes = COCO_CLASSES
    config.model.conv_impl = conv_impl
    config.data.image_sizes = (res,)
    config.data.eval_image_size = res
    config.data.max_boxes = max_boxes
    config.global_batch_size = config.eval_batch_size = batch
    config.total_steps, config.warmup_steps = 1000, 10
    return config


def random_train_batch(batch: int, res: int, max_boxes: int, boxes: int, classes: int, seed: int = 0) -> dict:
    """Random images and `boxes` random boxes (8 to res / 2 px wide and high) per image, padded to `max_boxes`."""
    rng = np.random.default_rng(seed)
    wh = rng.uniform(8, res / 2, size=(batch, max_boxes, 2))
    xy = rng.uniform(0, 1, size=(batch, max_boxes, 2)) * (res - wh)
    mask = np.zeros((batch, max_boxes), np.int32)
    mask[:, :boxes] = 1
    return {"image": rng.integers(0, 256, size=(batch, res, res, 3), dtype=np.uint8),
            "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
            "classes": rng.integers(0, classes, size=(batch, max_boxes), dtype=np.int32), "box_mask": mask}


def random_eval_batch(batch: int, res: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, size=(batch, res, res, 3), dtype=np.uint8),
            "image_id": np.arange(batch, dtype=np.int32), "scale": np.ones(batch, np.float32),
            "orig_hw": np.full((batch, 2), res, np.int32), "mask": np.ones(batch, np.int32)}


def build_steps(model_name: str, batch: int, res: int, *, max_boxes: int = 120, boxes: int = 8,
                conv_impl: str = "auto") -> tuple[dict[str, Callable[[], Any]], dict]:
    """({"train": run, "eval": run}, info): each `run()` does one call of the loop's compiled step on a
    fixed random batch and waits for it (the train state is donated and carried); info: compile times
    and the mean number of detections per image of the eval step."""
    from evit_jax.models.random_weights import random_variables
    from evit_jax.train import loop

    config = bench_config(model_name, batch, res, max_boxes=max_boxes, conv_impl=conv_impl)
    # COCO's published facts stand in for the data: nothing is read, the batches are random.
    experiment = loop.setup_experiment(config, devices=jax.local_devices()[:1], published_facts=True)
    info = {}
    t0 = time.perf_counter()
    train_executable = experiment.compile_train_steps()[(res, res)]
    info["train_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    eval_executable, eval_spec = experiment.eval_executable((res, res))
    info["eval_compile_s"] = time.perf_counter() - t0

    train_batch = experiment.global_batch(
        random_train_batch(batch, res, max_boxes, boxes, COCO_CLASSES),
        experiment.task.train_batch_spec(batch, (res, res)))
    eval_batch = experiment.global_batch(random_eval_batch(batch, res), eval_spec)
    variables = jax.device_put(random_variables(experiment.model, (1, res, res, 3), seed=3))
    state = [experiment.init_state()]

    def train():
        state[0], metrics = train_executable(state[0], train_batch)
        jax.block_until_ready((state[0], metrics))

    def evaluate():
        return jax.block_until_ready(eval_executable(variables, eval_batch))

    _, records, _ = evaluate()
    info["detections_per_image"] = float(np.asarray(records["valid"]).sum()) / batch
    return {"train": train, "eval": evaluate}, info


def benchmark_detection_steps(model_name: str = "efficientvit_det_b1", batch: int = 8, res: int = 640, *,
                              steps: int = 6, warmup: int = 2, max_boxes: int = 120, boxes: int = 8,
                              conv_impl: str = "auto") -> dict:
    """images/s of the loop's detection train step and eval step (with NMS), and their compile times."""
    from evit_jax.tools.benchmark import host_load_figures, time_in_phases

    calls, info = build_steps(model_name, batch, res, max_boxes=max_boxes, boxes=boxes, conv_impl=conv_impl)
    timings = time_in_phases(calls, steps, warmup)
    result = {"model": model_name, "batch": batch, "res": res, "max_boxes": max_boxes, "boxes": boxes,
              "backend": jax.default_backend(), **info}
    for name, timing in timings.items():
        result[f"{name}_images_per_s"] = batch / timing.median
        result[f"{name}_step_ms"] = 1000 * timing.median
    result.update(host_load_figures(timings))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientvit_det_b1")
    parser.add_argument("--batch", type=int, default=8, help="images per train and eval step")
    parser.add_argument("--res", type=int, default=640, help="square input size (multiple of 32)")
    parser.add_argument("--steps", type=int, default=6, help="timed calls of each step (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-boxes", type=int, default=120, help="padded boxes per image (COCO recipe: 120)")
    parser.add_argument("--boxes", type=int, default=8, help="real boxes per image")
    parser.add_argument("--conv-impl", choices=("auto", "lax", "fast"), default="auto")
    args = parser.parse_args(argv)
    if not 0 <= args.boxes <= args.max_boxes:
        parser.error(f"--boxes={args.boxes} must lie in [0, --max-boxes={args.max_boxes}].")
    print(f"machine: {os.cpu_count()} CPU cores, {jax.default_backend()} backend "
          f"({jax.devices()[0].device_kind}), jax {jax.__version__}", flush=True)
    r = benchmark_detection_steps(args.model, args.batch, args.res, steps=args.steps, warmup=args.warmup,
                                  max_boxes=args.max_boxes, boxes=args.boxes, conv_impl=args.conv_impl)
    print(f"{r['model']} batch {r['batch']} @{r['res']}px, {r['boxes']} of {r['max_boxes']} boxes per image")
    print(f"  train step: {r['train_images_per_s']:.2f} images/s ({r['train_step_ms']:.0f} ms/step, "
          f"compile {r['train_compile_s']:.1f} s)")
    print(f"  eval step with NMS: {r['eval_images_per_s']:.2f} images/s ({r['eval_step_ms']:.0f} ms/step, "
          f"compile {r['eval_compile_s']:.1f} s, {r['detections_per_image']:.1f} detections per image)", flush=True)
    print(f"  host load: {r['host_load']}", flush=True)


if __name__ == "__main__":
    main()
