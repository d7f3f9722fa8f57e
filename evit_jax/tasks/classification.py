"""Image classification (ImageNet recipe of EfficientViT; the built-in ``evit_shapes`` demo).

Host side: grain pipelines from ``evit_jax.data`` (RandomResizedCrop + flip at a per-batch
resolution, optional RandAugment and random-erasing boxes for training; resize + centre crop
for evaluation), images stay uint8.
Device side: normalisation, random erasing of the host's boxes, label smoothing, mixup/cutmix
(exactly one per step, chosen with equal probability, lambda ~ Beta(alpha, alpha) shared by
the batch as in the official recipe), BCE-with-logits (official ``bce: true``) or softmax
cross-entropy, and exact top-1/top-5 counts for evaluation.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evit_jax.data import pipeline, random_erasing, sources, transforms
from evit_jax.data.transforms import normalize_images
from evit_jax.tasks.base import DatasetTask


def erase_boxes(images: jax.Array, boxes: jax.Array) -> jax.Array:
    """Sets box ``boxes[i]`` = [top, left, height, width] (int, (N, 4)) of normalised NHWC image i
    to 0: timm's RandomErasing in its default ``const`` mode, on the boxes the host drew
    (``evit_jax.data.random_erasing``; a 0-size box leaves the image untouched)."""
    _, h, w, _ = images.shape
    top, left, height, width = (boxes[:, k, None, None] for k in range(4))
    ys = jnp.arange(h)[None, :, None]
    xs = jnp.arange(w)[None, None, :]
    inside = (ys >= top) & (ys < top + height) & (xs >= left) & (xs < left + width)
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """one-hot * (1 - s) + s / K (the official label_smooth)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def mix_batch(images: jax.Array, targets: jax.Array, rng: jax.Array, *, mixup_alpha: float,
              cutmix_alpha: float) -> tuple[jax.Array, jax.Array]:
    """Applies exactly one of mixup / cutmix (equal probability when both are enabled).

    Both pair every example with example ``perm[i]`` of a random permutation and mix the
    targets linearly. mixup: ``lam * x + (1 - lam) * x[perm]`` with lam ~ Beta(a, a).
    cutmix: a box of area ratio ~(1 - lam) centred at a uniform random pixel (clipped to the
    image; drawn per example) is pasted from ``x[perm]``, and the targets are mixed with the
    exact pasted area (lam_i = 1 - box_area / (H * W)).
    """
    enabled = [(name, a) for name, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not enabled:
        return images, targets
    b, h, w, _ = images.shape
    k_choice, k_lam, k_perm, k_x, k_y = jax.random.split(rng, 5)
    if len(enabled) == 2:
        use_cutmix = jax.random.bernoulli(k_choice, 0.5)
        alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    else:
        use_cutmix = jnp.asarray(enabled[0][0] == "cutmix")
        alpha = jnp.asarray(enabled[0][1], jnp.float32)
    lam = jnp.clip(jax.random.beta(k_lam, alpha, alpha), 0.0, 1.0)

    partner = jax.random.permutation(k_perm, b)
    other_images, other_targets = images[partner], targets[partner]

    # mixup
    mixed_images = lam * images + (1.0 - lam) * other_images
    mixed_targets = lam * targets + (1.0 - lam) * other_targets

    # cutmix
    cut = jnp.sqrt(1.0 - lam)
    cx = jax.random.randint(k_x, (b,), 0, w).astype(jnp.float32)
    cy = jax.random.randint(k_y, (b,), 0, h).astype(jnp.float32)
    x1 = jnp.floor(jnp.clip(cx - w * cut / 2, 0, w)).astype(jnp.int32)
    x2 = jnp.floor(jnp.clip(cx + w * cut / 2, 0, w)).astype(jnp.int32)
    y1 = jnp.floor(jnp.clip(cy - h * cut / 2, 0, h)).astype(jnp.int32)
    y2 = jnp.floor(jnp.clip(cy + h * cut / 2, 0, h)).astype(jnp.int32)
    ys = jnp.arange(h)[None, :, None]
    xs = jnp.arange(w)[None, None, :]
    box = (ys >= y1[:, None, None]) & (ys < y2[:, None, None]) & (xs >= x1[:, None, None]) & (xs < x2[:, None, None])
    cut_images = jnp.where(box[..., None], other_images, images)
    lam_i = 1.0 - ((x2 - x1) * (y2 - y1)).astype(jnp.float32) / (h * w)
    cut_targets = lam_i[:, None] * targets + (1.0 - lam_i[:, None]) * other_targets

    return (jnp.where(use_cutmix, cut_images, mixed_images),
            jnp.where(use_cutmix, cut_targets, mixed_targets))


def classification_loss(logits: jax.Array, targets: jax.Array, bce: bool) -> jax.Array:
    """Mean BCE-with-logits over all (example, class) entries, or mean soft-target CE."""
    logits = logits.astype(jnp.float32)
    if bce:
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean()
    return optax.softmax_cross_entropy(logits, targets).mean()


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example 1/0: label among the k largest logits."""
    _, top = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jnp.any(top == labels[:, None], axis=-1)


class ClassificationTask(DatasetTask):
    """See the module docstring; config keys under ``model``, ``data``, ``loss``, ``mix``."""

    name = "classification"

    # ------------------------------------------------------------------ host side

    def check_config(self) -> None:
        super().check_config()
        d = self.config.data
        for size in list(d.image_sizes) + [d.eval_image_size]:
            if int(size) % 32:
                raise ValueError(f"image size {size} is not a multiple of 32 (EfficientViT downsamples by 32).")
        if len(d.randaugment) not in (0, 2) or (len(d.randaugment) == 2 and not (
                int(d.randaugment[0]) >= 1 and 0 <= float(d.randaugment[1]) <= 10)):
            raise ValueError(f"config.data.randaugment={tuple(d.randaugment)} must be () or (n >= 1 ops, "
                             "magnitude m in [0, 10]), e.g. (2, 5).")
        if not 0.0 <= float(d.erasing_prob) <= 1.0:
            raise ValueError(f"config.data.erasing_prob={d.erasing_prob} must lie in [0, 1].")

    def train_resolutions(self):
        return [(int(s), int(s)) for s in self.config.data.image_sizes]

    def eval_batch_keys(self):
        s = int(self.config.data.eval_image_size)
        return [(s, s)]

    def train_iterator(self, seed: int, local_batch_size: int):
        d = self.config.data
        source = sources.get_source(d.name, d.train_split, self.data_dir)
        transform = transforms.ClassificationTrainTransform(
            scale=(float(d.rrc_scale_min), 1.0), flip_probability=0.5 if d.hflip else 0.0,
            randaugment=tuple(int(v) for v in d.randaugment) or None, erasing_prob=float(d.erasing_prob),
            image_key=self.info.image_key, label_key=self.info.label_key)
        return pipeline.make_train_iterator(
            source, transform, global_batch_size=local_batch_size * jax.process_count(),
            image_sizes=list(d.image_sizes), seed=seed, process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=d.num_workers)

    def eval_iterator(self, local_batch_size: int):
        d = self.config.data
        source = sources.get_source(d.name, d.eval_split, self.data_dir)
        transform = transforms.ClassificationEvalTransform(
            size=int(d.eval_image_size), crop_ratio=float(d.eval_crop_ratio),
            image_key=self.info.image_key, label_key=self.info.label_key)
        return pipeline.make_eval_iterator(
            source, transform, global_batch_size=local_batch_size * jax.process_count(),
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=d.num_workers)

    def train_batch_spec(self, global_batch_size, resolution):
        h, w = resolution
        spec = {"image": jax.ShapeDtypeStruct((global_batch_size, h, w, 3), jnp.uint8),
                "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)}
        if self.config.data.erasing_prob > 0:
            spec[random_erasing.ERASE_BOX_KEY] = jax.ShapeDtypeStruct((global_batch_size, 4), jnp.int32)
        return spec

    def eval_batch_spec(self, global_batch_size, key):
        spec = self.train_batch_spec(global_batch_size, key)  # key: the eval resolution
        spec.pop(random_erasing.ERASE_BOX_KEY, None)
        spec["mask"] = jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)
        return spec

    def is_classifier_param(self, path: str) -> bool:
        # The final LinearLayer of ClsHead (official `head.op_list.3.linear`).
        return path.startswith("head/op_list_3/")

    def finalize_eval(self, sums: Mapping[str, np.ndarray],
                      records: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """Top-1/top-5 accuracy (%), mean loss and example count from the summed counts; the
        task has no per-example records (``records`` is ignored)."""
        n = max(float(sums["count"]), 1.0)
        return {"top1": 100.0 * float(sums["top1_correct"]) / n,
                "top5": 100.0 * float(sums["top5_correct"]) / n,
                "loss": float(sums["loss_sum"]) / n,
                "num_examples": float(sums["count"])}

    # ------------------------------------------------------------------ device side
    def preprocess_train(self, batch, rng):
        images = normalize_images(batch["image"])
        if random_erasing.ERASE_BOX_KEY in batch:  # before mixing, as timm erases each sample
            images = erase_boxes(images, batch[random_erasing.ERASE_BOX_KEY])
        targets = smooth_labels(batch["label"], self.num_classes, self.config.loss.label_smoothing)
        images, targets = mix_batch(images, targets, rng, mixup_alpha=float(self.config.mix.mixup_alpha),
                                    cutmix_alpha=float(self.config.mix.cutmix_alpha))
        return images, {"soft": targets, "label": batch["label"]}

    def preprocess_eval(self, batch):
        return normalize_images(batch["image"]), batch["label"]

    def loss_and_metrics(self, outputs, targets):
        loss = classification_loss(outputs, targets["soft"], bool(self.config.loss.bce))
        metrics = {"loss": loss}
        mixing = self.config.mix.mixup_alpha > 0 or self.config.mix.cutmix_alpha > 0
        if not mixing:  # accuracy on mixed targets is meaningless (the official code skips it too)
            metrics["top1"] = 100.0 * jnp.mean(topk_correct(outputs, targets["label"], 1).astype(jnp.float32))
        return loss, metrics

    def eval_statistics(self, outputs, targets, mask):
        mask = mask.astype(jnp.int32)
        k5 = min(5, outputs.shape[-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), targets)
        return {"count": jnp.sum(mask),
                "top1_correct": jnp.sum(topk_correct(outputs, targets, 1) * mask),
                "top5_correct": jnp.sum(topk_correct(outputs, targets, k5) * mask),
                "loss_sum": jnp.sum(ce * mask)}
