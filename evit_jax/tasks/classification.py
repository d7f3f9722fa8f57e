"""Image classification (ImageNet recipe of EfficientViT; the built-in ``evit_shapes`` demo).

Host side: grain pipelines from ``evit_jax.data`` (RandomResizedCrop + flip at a per-batch
resolution for training; resize + centre crop for evaluation), images stay uint8.
Device side: normalisation, label smoothing, mixup/cutmix (exactly one per step, chosen with
equal probability, lambda ~ Beta(alpha, alpha) shared by the batch as in the official
recipe; each example's random partner is drawn from its own device's block of the batch, so
mixing moves no images between devices), BCE-with-logits (official ``bce: true``) or softmax cross-entropy, and exact
top-1/top-5 counts for evaluation.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evit_jax.data import pipeline, sources, transforms
from evit_jax.data.transforms import normalize_images
from evit_jax.tasks.base import DatasetTask

def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """one-hot * (1 - s) + s / K (the official label_smooth)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def mix_draws(rng: jax.Array, batch: int, height: int, width: int, *, mixup_alpha: float,
              cutmix_alpha: float, shards: int = 1) -> dict[str, jax.Array] | None:
    """The random choices of one mixup/cutmix step (None when both alphas are 0).

    ``use_cutmix``: which of the two (equal probability when both are enabled); ``lam`` ~
    Beta(a, a), one per batch; ``partner`` (batch,) int32: example i is mixed with example
    ``partner[i]``, a uniformly random permutation WITHIN each of the ``shards`` equal contiguous
    blocks of the batch (one block per device: the partner is on the same device, so mixing needs no
    cross-device gather; with one block it is a permutation of the whole batch); ``box`` (batch, 4)
    int32 ``(y1, y2, x1, x2)``: cutmix's box of area ratio ~(1 - lam) centred at a uniform random
    pixel, clipped to the image, drawn per example.
    """
    enabled = [(name, a) for name, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not enabled:
        return None
    if batch % shards:
        raise ValueError(f"a batch of {batch} does not split into {shards} equal blocks.")
    h, w = height, width
    k_choice, k_lam, k_perm, k_x, k_y = jax.random.split(rng, 5)
    if len(enabled) == 2:
        use_cutmix = jax.random.bernoulli(k_choice, 0.5)
        alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    else:
        use_cutmix = jnp.asarray(enabled[0][0] == "cutmix")
        alpha = jnp.asarray(enabled[0][1], jnp.float32)
    lam = jnp.clip(jax.random.beta(k_lam, alpha, alpha), 0.0, 1.0)
    block = batch // shards
    local = jax.vmap(lambda k: jax.random.permutation(k, block))(jax.random.split(k_perm, shards))
    partner = (local + block * jnp.arange(shards)[:, None]).reshape(batch).astype(jnp.int32)
    cut = jnp.sqrt(1.0 - lam)
    cx = jax.random.randint(k_x, (batch,), 0, w).astype(jnp.float32)
    cy = jax.random.randint(k_y, (batch,), 0, h).astype(jnp.float32)
    x1 = jnp.floor(jnp.clip(cx - w * cut / 2, 0, w)).astype(jnp.int32)
    x2 = jnp.floor(jnp.clip(cx + w * cut / 2, 0, w)).astype(jnp.int32)
    y1 = jnp.floor(jnp.clip(cy - h * cut / 2, 0, h)).astype(jnp.int32)
    y2 = jnp.floor(jnp.clip(cy + h * cut / 2, 0, h)).astype(jnp.int32)
    return {"use_cutmix": use_cutmix, "lam": lam, "partner": partner, "box": jnp.stack([y1, y2, x1, x2], axis=1)}


def _gather_within_blocks(x: jax.Array, partner: jax.Array, shards: int) -> jax.Array:
    """``x[partner]`` for a ``partner`` that stays within each of ``shards`` contiguous blocks, written
    as a per-block gather (the block axis is the devices' axis, so XLA partitions it without moving
    examples between devices)."""
    block = x.shape[0] // shards
    local = (partner - block * (jnp.arange(x.shape[0]) // block)).reshape(shards, block)
    blocks = x.reshape(shards, block, *x.shape[1:])
    return jax.vmap(lambda xs, idx: xs[idx])(blocks, local).reshape(x.shape)


def mix_batch(images: jax.Array, targets: jax.Array, rng: jax.Array, *, mixup_alpha: float,
              cutmix_alpha: float, shards: int = 1) -> tuple[jax.Array, jax.Array]:
    """Applies exactly one of mixup / cutmix (equal probability when both are enabled), with the
    choices of :func:`mix_draws` (partners within each of ``shards`` blocks of the batch).

    Targets are mixed linearly. mixup: ``lam * x + (1 - lam) * x[partner]``. cutmix: the box is
    pasted from ``x[partner]`` and the targets are mixed with the exact pasted area
    (lam_i = 1 - box_area / (H * W)).
    """
    b, h, w, _ = images.shape
    draws = mix_draws(rng, b, h, w, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, shards=shards)
    if draws is None:
        return images, targets
    lam, partner = draws["lam"], draws["partner"]
    other_images = _gather_within_blocks(images, partner, shards)
    other_targets = _gather_within_blocks(targets, partner, shards)

    mixed_images = lam * images + (1.0 - lam) * other_images
    mixed_targets = lam * targets + (1.0 - lam) * other_targets

    y1, y2, x1, x2 = (draws["box"][:, i] for i in range(4))
    ys = jnp.arange(h)[None, :, None]
    xs = jnp.arange(w)[None, None, :]
    box = (ys >= y1[:, None, None]) & (ys < y2[:, None, None]) & (xs >= x1[:, None, None]) & (xs < x2[:, None, None])
    cut_images = jnp.where(box[..., None], other_images, images)
    lam_i = 1.0 - ((x2 - x1) * (y2 - y1)).astype(jnp.float32) / (h * w)
    cut_targets = lam_i[:, None] * targets + (1.0 - lam_i[:, None]) * other_targets

    use_cutmix = draws["use_cutmix"]
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
        for size in list(self.config.data.image_sizes) + [self.config.data.eval_image_size]:
            if int(size) % 32:
                raise ValueError(f"image size {size} is not a multiple of 32 (EfficientViT downsamples by 32).")

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
        return {"image": jax.ShapeDtypeStruct((global_batch_size, h, w, 3), jnp.uint8),
                "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)}

    def eval_batch_spec(self, global_batch_size, key):
        spec = self.train_batch_spec(global_batch_size, key)  # key: the eval resolution
        spec["mask"] = jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)
        return spec

    def is_classifier_param(self, path: str) -> bool:
        # The final LinearLayer of ClsHead (official `head.op_list.3.linear`).
        return path.startswith("head/op_list_3/")

    def finalize_eval(self, sums: Mapping[str, np.ndarray]) -> dict[str, float]:
        n = max(float(sums["count"]), 1.0)
        return {"top1": 100.0 * float(sums["top1_correct"]) / n,
                "top5": 100.0 * float(sums["top5_correct"]) / n,
                "loss": float(sums["loss_sum"]) / n,
                "num_examples": float(sums["count"])}

    # ------------------------------------------------------------------ device side
    def preprocess_train(self, batch, rng):
        images = normalize_images(batch["image"])
        targets = smooth_labels(batch["label"], self.num_classes, self.config.loss.label_smoothing)
        images, targets = mix_batch(images, targets, rng, mixup_alpha=float(self.config.mix.mixup_alpha),
                                    cutmix_alpha=float(self.config.mix.cutmix_alpha), shards=self.batch_shards)
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
