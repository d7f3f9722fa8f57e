"""Semantic segmentation (Cityscapes, ADE20K, the built-in ``evit_seg_shapes`` demo).

Host side (grain, numpy; ``evit_jax.data.seg_transforms``):
  train: joint random rescale (uniform in ``data.scale_range`` of the image fitted into
  ``data.base_size``), random crop to the batch resolution (padded with ignore labels where
  the rescaled image is smaller), horizontal flip, photometric jitter (brightness,
  contrast, saturation, hue). Images stay uint8.
  eval: the official single-scale protocol (``data.eval_protocol``): Cityscapes images are
  resized (bicubic) to crop x 2crop, ADE20K images to short side = crop with the long side
  rounded up to a multiple of 32; the label keeps its full size. Examples are batched by
  model input size (:func:`evit_jax.data.pipeline.eval_batch_plan`; sizes read from the
  image headers), so the model sees every image exactly at its own size, as the official
  batch-1 evaluation does, with one compiled eval step per input size. Labels are padded
  (255) to the largest label of their batch's bucket; each example carries its valid
  sizes ``image_hw`` / ``label_hw``. (With protocol "none" an image whose sides are not
  multiples of 32 is padded bottom/right up to the next multiple.)

Device side:
  train loss: stride-8 logits are upsampled to the crop size (``loss.upsample``, bilinear by
  default) and scored with per-pixel softmax cross-entropy averaged over the pixels whose
  label is not ``ignore_index`` (255) in the whole global batch.
  eval: the VALID part of each example's logits is resized to its label size with the
  PyTorch-equivalent bicubic kernel (one interpolation matrix per axis built in-graph from
  the valid sizes, zero outside them), argmax, then per-class intersection and union
  counts (``evit_jax.tasks.seg_metrics``) over non-ignored, non-padding pixels. The loop
  sums them over batches, devices and hosts; ``finalize_eval`` turns the sums into mIoU
  and per-class IoU.

Initialisation (``--config.init_from``): an official/converted SEGMENTATION checkpoint
loads completely; a CLASSIFICATION (or backbone) checkpoint of the same variant loads only
the backbone and leaves the head freshly initialised (see :meth:`load_init_variables`).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from evit_jax import interpolation
from evit_jax.data import pipeline, seg_transforms, sources
from evit_jax.tasks import seg_metrics
from evit_jax.tasks.base import BackboneInitMixin, DatasetTask
from evit_jax.data.transforms import normalize_images

EVAL_PROTOCOLS = ("cityscapes", "ade20k", "none")
UPSAMPLE_METHODS = ("bilinear", "bicubic")
# Rows of the label canvas upsampled and reduced to an argmax at a time in evaluation:
# bounds the float32 (batch, rows, width, classes) temporary for large label canvases.
_EVAL_ROW_CHUNK = 256


# ---------------------------------------------------------------------------- device math
def bicubic_matrices(in_sizes: jax.Array, out_sizes: jax.Array, padded_in: int, padded_out: int) -> jax.Array:
    """Per-example (padded_out, padded_in) torch-bicubic interpolation matrices.

    ``in_sizes``/``out_sizes`` (B,) int are the valid lengths (traced values are fine); row o
    of example b holds the weights of output o < out_sizes[b] over inputs i < in_sizes[b]
    (torch ``F.interpolate(mode="bicubic", align_corners=False)``: Keys a=-0.75, half-pixel
    centres, taps clamped to the valid border). Rows and columns beyond the valid sizes are
    zero, so padded logits never leak into the result.
    """
    n_in = jnp.maximum(in_sizes.astype(jnp.int32), 1)[:, None]
    n_out = jnp.maximum(out_sizes.astype(jnp.int32), 1)[:, None]
    scale = n_in.astype(jnp.float32) / n_out.astype(jnp.float32)
    dst = jnp.arange(padded_out, dtype=jnp.float32)[None, :]
    src = (dst + 0.5) * scale - 0.5
    base = jnp.floor(src)
    weights = interpolation.cubic_weights(src - base, xp=jnp)                  # (B, out, 4)
    taps = base.astype(jnp.int32)[..., None] + jnp.arange(-1, 3)                 # (B, out, 4)
    taps = jnp.clip(taps, 0, n_in[..., None] - 1)
    onehot = jax.nn.one_hot(taps, padded_in, dtype=jnp.float32)                  # (B, out, 4, in)
    matrix = jnp.einsum("bok,boki->boi", weights, onehot, precision=jax.lax.Precision.HIGHEST)
    valid_rows = jnp.arange(padded_out)[None, :] < out_sizes[:, None]
    return jnp.where(valid_rows[..., None], matrix, 0.0)


def upsampled_argmax(logits: jax.Array, image_hw: jax.Array, label_hw: jax.Array,
                     label_shape: tuple[int, int], stride: int = 8,
                     row_chunk: int = _EVAL_ROW_CHUNK) -> jax.Array:
    """argmax over classes of the valid logits bicubic-resized to each example's label size.

    logits (B, h, w, C) at ``stride`` of a padded input whose valid size is ``image_hw``
    (B, 2); returns int32 (B, *label_shape) (values outside ``label_hw`` are meaningless and
    must be masked by the caller, e.g. with the label canvas padding of 255).
    """
    b, h, w, _ = logits.shape
    lh, lw = label_shape
    logits = logits.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    mh = bicubic_matrices(image_hw[:, 0] // stride, label_hw[:, 0], h, lh)   # (B, lh, h)
    mw = bicubic_matrices(image_hw[:, 1] // stride, label_hw[:, 1], w, lw)   # (B, lw, w)
    cols = jnp.einsum("bpw,bhwc->bhpc", mw, logits, precision=hi)           # (B, h, lw, C)
    chunk = min(row_chunk, lh)
    n_chunks = -(-lh // chunk)
    mh = jnp.pad(mh, ((0, 0), (0, n_chunks * chunk - lh), (0, 0)))
    mh = mh.reshape(b, n_chunks, chunk, h).transpose(1, 0, 2, 3)              # (n, B, chunk, h)

    def rows(m):
        return jnp.argmax(jnp.einsum("boh,bhpc->bopc", m, cols, precision=hi), axis=-1).astype(jnp.int32)

    pred = jax.lax.map(rows, mh)                                             # (n, B, chunk, lw)
    return pred.transpose(1, 0, 2, 3).reshape(b, n_chunks * chunk, lw)[:, :lh]


def upsample_logits(logits: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
    """(B, h, w, C) -> (B, *size, C) float32; bilinear (== torch align_corners=False when
    upsampling) or the torch-exact bicubic."""
    logits = logits.astype(jnp.float32)
    if tuple(logits.shape[1:3]) == tuple(size):
        return logits
    if method == "bicubic":
        from evit_jax.models.resize import resize_bicubic
        return resize_bicubic(logits, size)
    return jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]), "bilinear")


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """(mean CE over non-ignored pixels, number of those pixels). logits (B,H,W,C), labels (B,H,W)."""
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(count, 1), count


# ---------------------------------------------------------------------------- host helpers
def _ceil32(size: tuple[int, int]) -> tuple[int, int]:
    return tuple(-(-int(n) // 32) * 32 for n in size)


def eval_buckets(image_sizes: np.ndarray, protocol: str, crop_size: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per eval example (``image_sizes`` (N, 2) of the stored images): the ((input h, w),
    (label canvas h, w)) of its batch. The input is the protocol's size (rounded up to a
    multiple of 32, which the official protocols already are); the label canvas is the
    largest label (= stored image) among the examples of that input size."""
    inputs = [_ceil32(seg_transforms.eval_input_size(protocol, int(h), int(w), crop_size))
              for h, w in image_sizes]
    canvas: dict[tuple[int, int], tuple[int, int]] = {}
    for shape, (h, w) in zip(inputs, image_sizes):
        ch, cw = canvas.get(shape, (0, 0))
        canvas[shape] = (max(ch, int(h)), max(cw, int(w)))
    return [(shape, canvas[shape]) for shape in inputs]


def _hw(value) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


def _sanitize(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.strip()).strip("_") or "class"


# ---------------------------------------------------------------------------- the task
class SegmentationTask(BackboneInitMixin, DatasetTask):
    """See the module docstring. Config keys: ``model``, ``data`` (``image_sizes`` = train
    crops, ``scale_range``, ``base_size``, ``hflip``, ``photometric``, ``eval_protocol``,
    ``eval_crop_size``), ``loss.upsample``."""

    name = "segmentation"

    # ------------------------------------------------------------------ host side

    @property
    def ignore_index(self) -> int:
        return int(self.info.ignore_index if self.info.ignore_index is not None else 255)

    @property
    def class_names(self) -> list[str]:
        return self.dataset_class_names()

    def check_config(self) -> None:
        super().check_config()
        c = self.config
        if c.loss.upsample not in UPSAMPLE_METHODS:
            raise ValueError(f"config.loss.upsample={c.loss.upsample!r}; use one of {UPSAMPLE_METHODS}.")
        if c.data.eval_protocol not in EVAL_PROTOCOLS:
            raise ValueError(f"config.data.eval_protocol={c.data.eval_protocol!r}; use one of {EVAL_PROTOCOLS}.")
        lo, hi = (float(s) for s in c.data.scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"config.data.scale_range={tuple(c.data.scale_range)} must satisfy 0 < min <= max.")
        for size in self.train_resolutions():
            if size[0] % 32 or size[1] % 32:
                raise ValueError(f"image size {size} is not a multiple of 32 (EfficientViT downsamples by 32); "
                                 "fix data.image_sizes.")
        if c.data.eval_protocol != "none" and int(c.data.eval_crop_size) % 32:
            raise ValueError(f"config.data.eval_crop_size={c.data.eval_crop_size} is not a multiple of 32.")

    def check_data(self) -> None:
        super().check_data()
        self.check_num_classes()

    def train_resolutions(self):
        return [_hw(s) for s in self.config.data.image_sizes]

    def eval_bucket_keys(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Per eval example, the (input, label canvas) shapes of its batch (:func:`eval_buckets`);
        read once from the image headers and kept."""
        if getattr(self, "_eval_bucket_keys", None) is None:
            d = self.config.data
            if not self.published_facts:
                sizes = sources.image_sizes(d.name, d.eval_split, self.data_dir, self.info.image_key)
            elif self.info.eval_image_hw is not None:
                sizes = np.asarray([self.info.eval_image_hw])
            else:
                # Image sizes vary (ADE20K) and are unknown without the data: the nominal square of the
                # protocol's crop stands for them (the real split compiles one step per input size).
                crop = int(d.eval_crop_size)
                logging.warning("%s: eval image sizes vary and the data is not read; compiling the nominal "
                                "%dx%d eval input only.", d.name, crop, crop)
                sizes = np.asarray([(crop, crop)])
            self._eval_bucket_keys = eval_buckets(sizes, d.eval_protocol, int(d.eval_crop_size))
        return self._eval_bucket_keys

    def train_iterator(self, seed: int, local_batch_size: int):
        d = self.config.data
        source = sources.get_source(d.name, d.train_split, self.data_dir)
        base = tuple(int(s) for s in d.base_size) if len(d.base_size) else None
        transform = seg_transforms.SegTrainTransform(
            scale_range=(float(d.scale_range[0]), float(d.scale_range[1])), base_size=base,
            flip_prob=0.5 if d.hflip else 0.0,
            jitter=seg_transforms.PhotometricJitter() if d.photometric else None,
            image_key=self.info.image_key, label_key=self.info.label_key, ignore_index=self.ignore_index)
        return pipeline.make_train_iterator(
            source, transform, global_batch_size=local_batch_size * jax.process_count(),
            image_sizes=self.train_resolutions(), seed=seed, process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=d.num_workers)

    def eval_iterator(self, local_batch_size: int):
        d = self.config.data
        source = sources.get_source(d.name, d.eval_split, self.data_dir)
        transform = seg_transforms.SegEvalTransform(protocol=d.eval_protocol, crop_size=int(d.eval_crop_size),
                            image_key=self.info.image_key, label_key=self.info.label_key,
                            ignore_index=self.ignore_index)
        return pipeline.make_bucketed_eval_iterator(
            source, transform, self.eval_bucket_keys(),
            global_batch_size=local_batch_size * jax.process_count(),
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=d.num_workers)

    def train_batch_spec(self, global_batch_size, resolution):
        h, w = resolution
        return {"image": jax.ShapeDtypeStruct((global_batch_size, h, w, 3), jnp.uint8),
                "label": jax.ShapeDtypeStruct((global_batch_size, h, w), jnp.int32)}

    def eval_batch_keys(self):
        return sorted(set(self.eval_bucket_keys()))

    def eval_batch_key(self, batch):
        """((image h, w), (label h, w)) of a numpy eval batch."""
        return tuple(int(n) for n in batch["image"].shape[1:3]), tuple(int(n) for n in batch["label"].shape[1:3])

    def eval_batch_spec(self, global_batch_size, key):
        (h, w), (lh, lw) = key
        n = global_batch_size
        return {"image": jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8),
                "label": jax.ShapeDtypeStruct((n, lh, lw), jnp.int32),
                "image_hw": jax.ShapeDtypeStruct((n, 2), jnp.int32),
                "label_hw": jax.ShapeDtypeStruct((n, 2), jnp.int32),
                "mask": jax.ShapeDtypeStruct((n,), jnp.int32)}

    def is_classifier_param(self, path: str) -> bool:
        # The output convs of SegHead; only leaves whose shape depends on num_classes differ.
        return path.startswith("head/output_ops_0_op_list_")

    def finalize_eval(self, sums: Mapping[str, np.ndarray],
                      records: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """mIoU (fraction in [0, 1], official definition), pixel and mean accuracy, and the
        IoU of every class as ``iou/<name>`` (NaN for a class absent from the whole split);
        logs the per-class table. The task has no per-example records (``records`` is ignored)."""
        stats = {k: np.asarray(sums[k]) for k in seg_metrics.STAT_KEYS}
        names = self.class_names
        table = seg_metrics.format_iou_table(stats, names)
        logging.info("Per-class IoU on %s/%s (%d images):\n%s", self.config.data.name,
                     self.config.data.eval_split, int(sums["count"]), table)
        metrics = dict(seg_metrics.segmentation_metrics(stats))
        metrics["num_examples"] = float(sums["count"])
        for name, value in zip(names, seg_metrics.per_class_iou(stats)):
            metrics[f"iou/{_sanitize(name)}"] = float(value)
        return metrics

    # ------------------------------------------------------------------ device side
    def preprocess_train(self, batch, rng):
        del rng  # all augmentation happens on the host, per example
        return normalize_images(batch["image"]), batch["label"]

    def preprocess_eval(self, batch):
        targets = {"label": batch["label"], "image_hw": batch["image_hw"], "label_hw": batch["label_hw"]}
        return normalize_images(batch["image"]), targets

    def loss_and_metrics(self, outputs, targets):
        logits = upsample_logits(outputs, targets.shape[1:3], self.config.loss.upsample)
        loss, count = pixel_cross_entropy(logits, targets, self.ignore_index)
        valid = targets != self.ignore_index
        correct = jnp.sum((jnp.argmax(logits, -1) == targets) & valid)
        return loss, {"loss": loss, "pixel_acc": 100.0 * correct / jnp.maximum(count, 1)}

    def eval_statistics(self, outputs, targets, mask):
        labels = targets["label"]
        pred = upsampled_argmax(outputs, targets["image_hw"], targets["label_hw"], labels.shape[1:3])
        stats = seg_metrics.segmentation_statistics(pred, labels, self.num_classes, self.ignore_index,
                                                    example_mask=mask)
        stats["count"] = jnp.sum(mask.astype(jnp.int32))
        return stats
