"""Predict with an EfficientViT model on image files.

    python -m evit_jax.predict --model efficientvit_seg_b1_cityscapes \
        --checkpoint efficientvit_seg_b1_cityscapes.pt street.jpg --out street_mask.png
    python -m evit_jax.predict --model efficientvit_b1 --checkpoint efficientvit_b1_r224.pt cat.jpg
    python -m evit_jax.predict --model efficientvit_seg_b0_cityscapes --checkpoint /tmp/evit_seg_demo scene.png
    python -m evit_jax.predict --checkpoint hub:efficientvit_b1.r224_in1k cat.jpg

--checkpoint is an official/timm PyTorch file (.pt/.pth/.safetensors), a directory written by
``evit_jax.convert.save_variables``, a training workdir of ``evit_jax.main`` (its latest
checkpoint; ``--ema`` takes the EMA weights; --model is optional: the workdir's), or ``hub:NAME``:
published weights by name (``evit_jax.convert.hub``), downloaded and converted once; --model is
then optional and the weights' own input size, crop ratio and numerics are the defaults.

Segmentation models write a class-colour mask (``--out``, default ``<image>_mask.png``) and an
overlay on the image (``<out>_overlay.png``), both at the input's size, and print the share of
each predicted class. The image is resized (bicubic, as the official evaluation) so that its
short side is ``--short_side`` (default: 1024 for Cityscapes models, 512 for ADE20K, the
training eval size for a workdir) and both sides are multiples of 32; the logits are resized
back to the input's size with the PyTorch-equivalent bicubic before the argmax.
Classification models print the top-5 classes after the official resize + centre crop
(``--image_size``, ``--crop_ratio``), with their names: the workdir's dataset's, or ImageNet's
for a 1000-class model (``evit_jax.data.imagenet_classes``); indices when none are known.
Detection models (``efficientvit_det_*``) see the image through YOLOX's evaluation letterbox
(``--image_size``, default: the workdir's ``data.eval_image_size``, else 640), keep the
detections scoring at least ``--score_threshold`` (default 0.3, YOLOX's demo) after class-aware
NMS at ``--nms_threshold`` (default 0.3, YOLOX's demo), draw them with their class name and
score on a copy of the image at its own size (``--out``, default ``<image>_boxes.png``) and print
them to stdout as one COCO-style JSON list: ``{"image", "bbox": [x, y, w, h] in original pixels,
"score", "category_id", "category_name"}`` (category ids and names from the workdir's dataset;
the class index and ``class_<k>`` otherwise). No detection weights are published, so
``hub:`` names a classification or segmentation model only.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

# Cityscapes train-id colours (the dataset's own colour coding).
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)


class PredictError(Exception):
    """A user error reported as one line."""


def generated_palette(num_classes: int) -> np.ndarray:
    """Distinct colours by spreading the bits of the class index over R, G and B (the classic
    PASCAL VOC construction): class 0 is black, neighbours differ strongly."""
    palette = np.zeros((num_classes, 3), np.uint8)
    for c in range(num_classes):
        value, r, g, b = c, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[c] = (r, g, b)
    return palette


def palette_for(dataset: str | None, num_classes: int) -> np.ndarray:
    if dataset == "cityscapes" and num_classes == len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE
    return generated_palette(num_classes)


def seg_input_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Model input size: short side -> ``short_side`` (aspect kept, the long side rounded UP to
    a multiple of 32, as the official ADE20K evaluation); ``short_side`` <= 0 keeps the size,
    rounded to the nearest multiple of 32 (at least 32)."""
    if short_side <= 0:
        return max(32, int(round(height / 32)) * 32), max(32, int(round(width / 32)) * 32)
    if short_side % 32:
        raise PredictError(f"--short_side={short_side} is not a multiple of 32.")
    if height <= width:
        return short_side, math.ceil(width / height * short_side / 32) * 32
    return math.ceil(height / width * short_side / 32) * 32, short_side


# ---------------------------------------------------------------------------- weights
def _workdir_variables(workdir: Path, model_name: str, use_ema: bool) -> tuple[dict, dict]:
    """(variables, run config) of the latest checkpoint of an evit_jax.main workdir."""
    import orbax.checkpoint as ocp

    from evit_jax.train import checkpoint as ckpt_lib

    info = ckpt_lib.read_run_info(str(workdir))
    if info.get("model") != model_name:
        raise PredictError(f"workdir {workdir} holds a {info.get('model')!r} run, not {model_name!r}; "
                           f"pass --model {info.get('model')}.")
    step = ckpt_lib.latest_complete_step(str(workdir))
    if step is None:
        raise PredictError(f"workdir {workdir} has no finished checkpoint yet.")
    state = ocp.StandardCheckpointer().restore(os.path.join(ckpt_lib.checkpoint_dir(str(workdir)), str(step), "state"))
    prefix = "ema_" if use_ema else ""
    variables = {"params": state[f"{prefix}params"], "batch_stats": state.get(f"{prefix}batch_stats", {})}
    return variables, info.get("config", {})


def _workdir_model(checkpoint: str) -> str | None:
    """The model a training workdir of evit_jax.main was trained with (its run_info.json), else None."""
    from evit_jax.train import checkpoint as ckpt_lib

    path = Path(checkpoint).expanduser()
    info = ckpt_lib.read_run_info(str(path)) if path.is_dir() else None
    return info.get("model") if info else None


def load_weights(checkpoint: str, model_name: str, use_ema: bool) -> tuple[dict, dict]:
    """(variables, run config or {}) from any supported checkpoint path or ``hub:NAME``."""
    from evit_jax.convert import is_hub_spec, load_variables, resolve_checkpoint

    if is_hub_spec(checkpoint):
        return load_variables(resolve_checkpoint(checkpoint), model_name, use_ema=use_ema), {}
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise PredictError(f"--checkpoint {checkpoint} does not exist (give a .pt/.pth/.safetensors file, a "
                           "converted directory or a training workdir).")
    if path.is_dir() and (path / "run_info.json").exists():
        return _workdir_variables(path, model_name, use_ema)
    return load_variables(str(path), model_name, use_ema=use_ema), {}


def infer_num_classes(task: str, params: dict) -> int:
    """Number of classes of the final layer in ``params``."""
    head = params["head"]
    if task == "classification":
        return int(np.shape(head["op_list_3"]["linear"]["bias"])[0])
    if task == "detection":
        return int(np.shape(head["cls_preds_0"]["bias"])[0])
    finals = sorted(k for k in head if k.startswith("output_ops_0_op_list_") and "bias" in head[k].get("conv", {}))
    return int(np.shape(head[finals[-1]]["conv"]["bias"])[0])


def _workdir_dataset_info(run_config: dict):
    """The `sources.DatasetInfo` of a training workdir's dataset when it is there (never built), else None."""
    from evit_jax.data import sources

    data = run_config.get("data", {})
    if not data.get("name"):
        return None
    data_dir = os.path.expanduser(data.get("data_dir", "~/tensorflow_datasets"))
    try:  # build=False: predicting reads a dataset that is there, never builds one
        return sources.get_info(data["name"], data_dir, build=False)
    except (FileNotFoundError, ValueError):
        return None


def class_names_for(spec, num_classes: int, run_config: dict) -> list[str] | None:
    """Class names when known: the official datasets' names, the workdir's dataset ones (ImageNet
    synset ids made readable), or ImageNet's for a 1000-class classifier not trained here on
    another dataset."""
    from evit_jax.data import imagenet_classes

    names = None
    dataset = run_config.get("data", {}).get("name")
    if spec.dataset in ("cityscapes", "ade20k") and not run_config:
        module = __import__(f"evit_jax.data.{spec.dataset}", fromlist=["CLASS_NAMES"])
        names = list(module.CLASS_NAMES)
    elif dataset:
        info = _workdir_dataset_info(run_config)
        names = imagenet_classes.readable_class_names(info.class_names) if info and info.class_names else None
    if (names is None and spec.task == "classification" and dataset in (None, "imagenet2012")
            and num_classes == imagenet_classes.NUM_IMAGENET_CLASSES):
        names = list(imagenet_classes.imagenet_class_names())
    return names if names is not None and len(names) == num_classes else None


# ---------------------------------------------------------------------------- predict
# One jitted forward per model (Flax modules hash and compare by their fields), kept for the
# process: every image of a folder reuses it, and XLA compiles once per input shape.
@functools.lru_cache(maxsize=8)
def _segmentation_forward(model):
    import jax
    import jax.numpy as jnp

    from evit_jax.data.transforms import normalize_images
    from evit_jax.tasks.segmentation import upsampled_argmax

    def segment(variables, x, out_hw):
        logits = model.apply(variables, normalize_images(x), train=False)
        return upsampled_argmax(logits, jnp.array([x.shape[1:3]], jnp.int32), jnp.array([out_hw], jnp.int32), out_hw)

    return jax.jit(segment, static_argnums=2)


@functools.lru_cache(maxsize=8)
def _classification_forward(model):
    import jax

    from evit_jax.data.transforms import normalize_images

    def classify(variables, x):
        logits = model.apply(variables, normalize_images(x), train=False)
        return jax.nn.softmax(logits.astype("float32"), axis=-1)

    return jax.jit(classify)


@functools.lru_cache(maxsize=8)
def _detection_forward(model, postprocess_config):
    import jax

    from evit_jax.data.transforms import normalize_images
    from evit_jax.models.det import detection_grid
    from evit_jax.tasks.det_postprocess import postprocess

    def detect(variables, x):
        raw = model.apply(variables, normalize_images(x), train=False)
        return postprocess(raw, detection_grid(x.shape[1], x.shape[2]), postprocess_config)

    return jax.jit(detect)


def predict_detection(model, variables, image: np.ndarray, image_size: int,
                      postprocess_config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) -> (boxes float64 (K, 4) x1, y1, x2, y2 in the image's pixels, scores (K,), classes
    (K,)), best first: YOLOX's evaluation letterbox to ``image_size``, the model, post-processing, and the
    boxes mapped back (clipped to the image)."""
    from evit_jax.data import det_transforms

    padded, scale = det_transforms.letterbox(image, image_size)
    dets = _detection_forward(model, postprocess_config)(variables, padded[None])
    boxes, scores, classes, valid = (np.asarray(a)[0] for a in (dets.boxes, dets.scores, dets.classes, dets.valid))
    return det_transforms.unletterbox_boxes(boxes[valid], scale, image.shape[:2]), scores[valid], classes[valid]


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: Sequence[str],
                    colours: np.ndarray) -> np.ndarray:
    """A copy of ``image`` with each box outlined in its colour and labelled ``<label> <score>``."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for box, score, label, colour in zip(boxes, scores, labels, colours):
        x1, y1, x2, y2 = (float(v) for v in box)
        colour = tuple(int(c) for c in colour)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=max(1, round(min(image.shape[:2]) / 200)))
        text = f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        width, height = right - left, bottom - top
        y = y1 - height - 2 if y1 - height - 2 >= 0 else y1   # above the box when it fits
        x = max(min(x1, image.shape[1] - width - 2), 0)       # inside the image's right edge
        draw.rectangle([x, y, x + width + 2, y + height + 2], fill=colour)
        brightness = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((x + 1, y), text, fill=(0, 0, 0) if brightness > 128 else (255, 255, 255))
    return np.asarray(canvas)


def detection_records(path: Path, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                      category_ids: Sequence[int] | None, names: Sequence[str] | None) -> list[dict]:
    """COCO-style result dicts of one image's detections: bbox [x, y, w, h] in original pixels."""
    records = []
    for box, score, k in zip(boxes, scores, classes):
        x1, y1, x2, y2 = (float(v) for v in box)
        records.append({"image": str(path), "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)],
                        "score": round(float(score), 5),
                        "category_id": int(category_ids[k]) if category_ids else int(k),
                        "category_name": names[k] if names else f"class_{int(k)}"})
    return records


def predict_segmentation(model, variables, image: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 (H, W, 3) -> int32 (H, W) class ids at the input's size."""
    from evit_jax.data import seg_transforms

    h, w = image.shape[:2]
    resized = seg_transforms.resize_image(image, seg_input_size(h, w, short_side), "bicubic")
    return np.asarray(_segmentation_forward(model)(variables, resized[None], (h, w)))[0]


def predict_classification(model, variables, image: np.ndarray, image_size: int, crop_ratio: float) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (num_classes,) softmax probabilities."""
    from evit_jax.data import transforms

    x = transforms.resize_center_crop(image, image_size, crop_ratio)
    return np.asarray(_classification_forward(model)(variables, x[None]))[0]


def colour_mask(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[np.clip(mask, 0, len(palette) - 1)]


def overlay(image: np.ndarray, colours: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    return np.clip(colours * opacity + image * (1 - opacity), 0, 255).astype(np.uint8)


def _boxes_path(image_path: Path, out: str | None) -> Path:
    return Path(out) if out else image_path.with_name(f"{image_path.stem}_boxes.png")


def _output_paths(image_path: Path, out: str | None) -> tuple[Path, Path]:
    mask_path = Path(out) if out else image_path.with_name(f"{image_path.stem}_mask.png")
    return mask_path, mask_path.with_name(f"{mask_path.stem}_overlay{mask_path.suffix or '.png'}")


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as pil:
            return np.asarray(pil.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise PredictError(f"cannot read image {path}: {e}") from None


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evit_jax.predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", default=None,
                        help="model name (evit_jax.models.list_models()); optional with --checkpoint hub:NAME or a workdir")
    parser.add_argument("--checkpoint", required=True,
                        help=".pt/.pth/.safetensors, converted dir, workdir, or hub:NAME (published weights)")
    parser.add_argument("--out", default=None,
                        help="segmentation: mask path; detection: the image with its boxes (one image only)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights of the checkpoint")
    parser.add_argument("--short_side", type=int, default=None,
                        help="segmentation input short side (multiple of 32; 0 keeps the size)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="classification crop size; detection letterbox size (multiple of 32)")
    parser.add_argument("--score_threshold", type=float, default=0.3, help="detection: lowest score drawn")
    parser.add_argument("--nms_threshold", type=float, default=0.3, help="detection: class-aware NMS IoU")
    parser.add_argument("--crop_ratio", type=float, default=None, help="classification crop ratio")
    parser.add_argument("--top_k", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (PredictError, ValueError, FileNotFoundError) as e:
        print(f"evit_jax.predict: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from evit_jax.convert import find_weights, is_hub_spec
    from evit_jax.models import create_model, get_model_spec

    published = find_weights(args.checkpoint) if is_hub_spec(args.checkpoint) else None  # ValueError: one line
    trained = _workdir_model(args.checkpoint) if published is None else None
    if args.model is None and published is None and trained is None:
        raise PredictError("--model is required unless --checkpoint is hub:NAME or a training workdir.")
    spec = get_model_spec(args.model or (published.model if published is not None else trained))  # close matches
    if published is not None and spec.name != published.model:
        raise PredictError(f"--checkpoint {args.checkpoint} holds {published.model} weights, not {spec.name}; "
                           f"drop --model or pass --model {published.model}.")
    if spec.task == "backbone":
        raise PredictError(f"{spec.name} is a bare backbone; use a classification, segmentation or detection model.")
    images = [Path(p) for p in args.images]
    for p in images:
        if not p.is_file():
            raise PredictError(f"image {p} does not exist.")
    if args.out and len(images) > 1:
        raise PredictError("--out names one output image; pass a single image or drop --out.")
    if args.out and spec.task == "classification":
        raise PredictError("--out is for segmentation and detection models; classification prints its top classes.")
    if spec.task == "detection":
        if args.image_size is not None and (args.image_size <= 0 or args.image_size % 32):
            raise PredictError(f"--image_size={args.image_size} is not a positive multiple of 32.")
        if not 0 <= args.score_threshold <= 1 or not 0 <= args.nms_threshold <= 1:
            raise PredictError("--score_threshold and --nms_threshold must lie in [0, 1].")
    if args.short_side is not None and args.short_side > 0 and args.short_side % 32:
        raise PredictError(f"--short_side={args.short_side} is not a multiple of 32.")

    variables, run_config = load_weights(args.checkpoint, spec.name, args.ema)
    num_classes = infer_num_classes(spec.task, variables["params"])
    # Published weights run with the numerics their accuracy was measured with (timm's for timm's files).
    model = create_model(spec.name, num_classes=num_classes,
                         **({"numerics": published.numerics} if published is not None else {}))
    names = class_names_for(spec, num_classes, run_config)
    data_cfg = run_config.get("data", {})

    if spec.task == "segmentation":
        if args.short_side is not None:
            short_side = args.short_side
        elif data_cfg:
            short_side = 0 if data_cfg.get("eval_protocol") == "none" else int(data_cfg.get("eval_crop_size", 0))
        elif published is not None:
            short_side = min(published.input_size)
        else:
            short_side = {"cityscapes": 1024, "ade20k": 512}.get(spec.dataset, 0)
        palette = palette_for(spec.dataset if not data_cfg else data_cfg.get("name"), num_classes)
        from PIL import Image
        for path in images:
            image = _read_image(path)
            mask = predict_segmentation(model, variables, image, short_side)
            colours = colour_mask(mask, palette)
            mask_path, overlay_path = _output_paths(path, args.out)
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(colours).save(mask_path)
            Image.fromarray(overlay(image, colours)).save(overlay_path)
            ids, counts = np.unique(mask, return_counts=True)
            share = ", ".join(f"{names[i] if names else i}: {100 * c / mask.size:.1f}%"
                              for i, c in sorted(zip(ids, counts), key=lambda t: -t[1]))
            print(f"{path}: {mask.shape[0]}x{mask.shape[1]} -> {mask_path}, {overlay_path} ({share})")
    elif spec.task == "detection":
        _predict_detections(args, images, model, variables, num_classes, names, run_config)
    else:
        if published is not None:  # the weights' own evaluation settings
            image_size = args.image_size or published.input_size[0]
            crop_ratio = args.crop_ratio or published.crop_ratio
        else:
            image_size = args.image_size or int(data_cfg.get("eval_image_size", 224))
            crop_ratio = args.crop_ratio or float(data_cfg.get("eval_crop_ratio", 0.95 if spec.variant == "b1" else 1.0))
        k = max(1, min(args.top_k, num_classes))
        for path in images:
            probs = predict_classification(model, variables, _read_image(path), image_size, crop_ratio)
            top = np.argsort(-probs)[:k]
            print(f"{path}:")
            for rank, c in enumerate(top, 1):
                label = f"{names[c]} (class {c})" if names else f"class {c}"
                print(f"  {rank}. {label}  p={probs[c]:.4f}")
    return 0


def _predict_detections(args, images: Sequence[Path], model, variables, num_classes: int, names,
                        run_config: dict) -> None:
    """Draws and prints the detections of every image (module docstring)."""
    from PIL import Image

    from evit_jax.tasks.det_postprocess import PostprocessConfig

    info = _workdir_dataset_info(run_config)
    category_ids = list(info.category_ids) if info is not None and info.category_ids else None
    image_size = args.image_size or int(run_config.get("data", {}).get("eval_image_size", 640))
    max_detections = int(run_config.get("postprocess", {}).get("max_detections", 100))
    config = PostprocessConfig(score_threshold=args.score_threshold, iou_threshold=args.nms_threshold,
                               max_detections=max_detections)
    palette = generated_palette(num_classes + 1)[1:]  # class k gets colour k + 1: never black
    results = []
    for path in images:
        image = _read_image(path)
        boxes, scores, classes = predict_detection(model, variables, image, image_size, config)
        labels = [names[k] if names else f"class_{k}" for k in classes]
        out = _boxes_path(path, args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw_detections(image, boxes, scores, labels, palette[classes])).save(out)
        print(f"{path}: {image.shape[0]}x{image.shape[1]}, {len(scores)} detections -> {out}", file=sys.stderr)
        results += detection_records(path, boxes, scores, classes, category_ids, names)
    print("[" + ",\n ".join(json.dumps(r) for r in results) + "]")  # valid JSON, one detection a line


def main() -> None:
    # Before JAX creates its CPU client: each forward then reuses its buffers instead of page-faulting
    # them in (seg-B1 at 1024x2048 on CPU: 591 -> 439 ms per image; evit_jax/host_memory.py). Not in
    # `run`, which other programs call after their own JAX start-up.
    from evit_jax import host_memory

    host_memory.retain_freed_memory()
    sys.exit(run())


if __name__ == "__main__":
    main()
