"""Image classification (ImageNet recipe of EfficientViT; the built-in ``evit_shapes`` demo).

Host side: grain pipelines from ``evit_jax.data`` (RandomResizedCrop + flip at a per-batch
resolution, optional RandAugment and random-erasing boxes for training; resize + centre crop
for evaluation), images stay uint8.
Device side: normalisation, random erasing of the host's boxes, label smoothing, mixup/cutmix
(exactly one per step, chosen with equal probability, lambda ~ Beta(alpha, alpha) shared by
the batch as in the official recipe), BCE-with-logits (official ``bce: true``) or softmax
cross-entropy, and exact top-1/top-5 counts for evaluation (optionally per class).

Optional parts of the official recipe (all off by default, see evit_jax/tasks/config.py):
MESA, a teacher term ratio x loss(outputs, sigmoid(EMA outputs)) once the training progress
reaches a threshold (:meth:`ClassificationTask.teacher_weight`); BatchNorm re-estimation before
evaluation from a fixed subset of the train split, through the train transform at the eval size
(:meth:`ClassificationTask.bn_reestimation_iterator`).
"""

from __future__ import annotations

import collections
import itertools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evit_jax.data import pipeline, random_erasing, sources, transforms
from evit_jax.data.transforms import normalize_images
from evit_jax.models import get_model_spec
from evit_jax.tasks.base import DatasetTask

# Tag of the random stream that picks and augments the BN re-estimation images (distinct from training's).
_BN_REESTIMATION_STREAM = 3


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
        c = self.config
        if float(c.mesa.ratio) < 0 or not 0.0 <= float(c.mesa.threshold) <= 1.0:
            raise ValueError(f"config.mesa.ratio={c.mesa.ratio} must be >= 0 (0: off) and config.mesa.threshold="
                             f"{c.mesa.threshold} in [0, 1].")
        if int(c.reset_bn.num_images) < 0 or (c.reset_bn.num_images and int(c.reset_bn.global_batch_size) <= 0):
            raise ValueError(f"config.reset_bn.num_images={c.reset_bn.num_images} must be >= 0 (0: off) and "
                             f"config.reset_bn.global_batch_size={c.reset_bn.global_batch_size} positive.")
        self._check_hub_init_from()

    def _check_hub_init_from(self) -> None:
        """init_from=hub:NAME must hold weights of this model (a table look-up, before any download)."""
        from evit_jax.convert import hub  # tasks may import convert (layering)

        if self.config.init_from and hub.is_hub_spec(self.config.init_from):
            weights = hub.find_weights(self.config.init_from)
            if get_model_spec(weights.model).name != self.model_name:
                raise ValueError(f"init_from={self.config.init_from} holds {weights.model} weights but the config "
                                 f"trains {self.model_name}; pass --config.model.name={weights.model} or "
                                 f"--config.init_from=hub:{self.model_name}.")

    def check_data(self) -> None:
        if not self.config.data.name:  # configs/finetune.py leaves it to the command line
            raise ValueError("config.data.name is empty: name the dataset to train on, --config.data.name=NAME of a "
                             "dataset prepared by python -m evit_jax.data.prepare image_folder --name NAME --src DIR "
                             "--data_dir D.")
        super().check_data()
        batch = self.bn_reestimation_batch_size()
        if batch and batch > (train_size := self.num_train_examples()):
            raise ValueError(f"config.reset_bn.global_batch_size={batch} exceeds the training split's {train_size} "
                             "images; lower it.")

    def train_resolutions(self):
        return [(int(s), int(s)) for s in self.config.data.image_sizes]

    def eval_batch_keys(self):
        s = int(self.config.data.eval_image_size)
        return [(s, s)]

    def _train_transform(self) -> transforms.ClassificationTrainTransform:
        d = self.config.data
        return transforms.ClassificationTrainTransform(
            scale=(float(d.rrc_scale_min), 1.0), flip_probability=0.5 if d.hflip else 0.0,
            randaugment=tuple(int(v) for v in d.randaugment) or None, erasing_prob=float(d.erasing_prob),
            image_key=self.info.image_key, label_key=self.info.label_key)

    def train_iterator(self, seed: int, local_batch_size: int):
        d = self.config.data
        source = sources.get_source(d.name, d.train_split, self.data_dir)
        return pipeline.make_train_iterator(
            source, self._train_transform(), global_batch_size=local_batch_size * jax.process_count(),
            image_sizes=list(d.image_sizes), seed=seed, process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=d.num_workers)

    # -- BatchNorm re-estimation (official reset_bn) ------------------------------
    def bn_reestimation_batch_size(self) -> int:
        return int(self.config.reset_bn.global_batch_size) if int(self.config.reset_bn.num_images) > 0 else 0

    def bn_reestimation_images(self, train_size: int) -> np.ndarray:
        """Indices (sorted) of the train-split images of the re-estimation pass: reset_bn.num_images
        of them (at most the split, rounded down to whole global batches), drawn once from the
        run's seed (the official pass uses a fixed random subset too)."""
        batch = self.bn_reestimation_batch_size()
        count = min(int(self.config.reset_bn.num_images), train_size) // batch * batch
        rng = np.random.default_rng([int(self.config.seed), _BN_REESTIMATION_STREAM])
        return np.sort(rng.permutation(train_size)[:count])

    def bn_reestimation_iterator(self, local_batch_size: int):
        """The official reset_bn images: a fixed subset of the train split through the TRAIN transform
        (RandomResizedCrop, flip, RandAugment, erasing boxes) at the eval resolution, no mixing. The
        images, their order and their augmentations are the same at every call (the official code
        draws them once and keeps them for the whole run)."""
        d = self.config.data
        source = sources.get_source(d.name, d.train_split, self.data_dir)
        indices = self.bn_reestimation_images(len(source))
        global_batch = local_batch_size * jax.process_count()
        seed = int(np.random.SeedSequence([int(self.config.seed), _BN_REESTIMATION_STREAM]).generate_state(1)[0])
        iterator = pipeline.make_train_iterator(
            _Subset(source, tuple(int(i) for i in indices)), self._train_transform(), global_batch_size=global_batch,
            image_sizes=[int(d.eval_image_size)], seed=seed, process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=d.num_workers)
        return itertools.islice(iterator, len(indices) // global_batch)  # one epoch of the subset

    def bn_reestimation_batch_spec(self, global_batch_size: int):
        s = int(self.config.data.eval_image_size)
        return self.train_batch_spec(global_batch_size, (s, s))

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

    def class_names(self) -> list[str]:
        """The dataset's class names as the per-class metrics name them: ImageNet synset ids made
        readable, a name two classes share followed by the class index ("crane (134)"), "class_<i>"
        when the dataset names none."""
        from evit_jax.data import imagenet_classes

        names = self.info.class_names
        if names is None or len(names) != self.num_classes:
            return [f"class_{i}" for i in range(self.num_classes)]
        names = imagenet_classes.readable_class_names(names)
        counts = collections.Counter(names)
        return [f"{name} ({i})" if counts[name] > 1 else name for i, name in enumerate(names)]

    def finalize_eval(self, sums: Mapping[str, np.ndarray],
                      records: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """Top-1/top-5 accuracy (%), mean loss and example count from the summed counts, and with
        ``per_class_metrics`` the top-1 of every class as ``top1/<class name>`` (classes without an
        eval example are left out); the task has no per-example records (``records`` is ignored)."""
        n = max(float(sums["count"]), 1.0)
        metrics = {"top1": 100.0 * float(sums["top1_correct"]) / n,
                   "top5": 100.0 * float(sums["top5_correct"]) / n,
                   "loss": float(sums["loss_sum"]) / n,
                   "num_examples": float(sums["count"])}
        if "class_count" in sums:
            for name, correct, count in zip(self.class_names(), sums["class_top1_correct"], sums["class_count"]):
                if count > 0:
                    metrics[f"top1/{name}"] = 100.0 * float(correct) / float(count)
        return metrics

    # ------------------------------------------------------------------ device side
    @staticmethod
    def _augmented_images(batch):
        """Normalised images with the host's erasing boxes applied (before any mixing, as timm
        erases each sample)."""
        images = normalize_images(batch["image"])
        if random_erasing.ERASE_BOX_KEY in batch:
            images = erase_boxes(images, batch[random_erasing.ERASE_BOX_KEY])
        return images

    def preprocess_bn_reestimation(self, batch):
        return self._augmented_images(batch)

    def preprocess_train(self, batch, rng):
        images = self._augmented_images(batch)
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

    def teacher_weight(self, progress):
        """MESA: mesa.ratio once the progress reaches mesa.threshold (official ``thresh <= progress``),
        else 0; None when mesa.ratio is 0 (off)."""
        ratio = float(self.config.mesa.ratio)
        if ratio <= 0:
            return None
        return jnp.where(progress >= float(self.config.mesa.threshold), ratio, 0.0).astype(jnp.float32)

    def teacher_loss(self, outputs, teacher_outputs):
        """The training loss with sigmoid(EMA logits) as the targets (official MESA term)."""
        return classification_loss(outputs, jax.nn.sigmoid(teacher_outputs.astype(jnp.float32)),
                                   bool(self.config.loss.bce))

    def eval_statistics(self, outputs, targets, mask):
        mask = mask.astype(jnp.int32)
        k5 = min(5, outputs.shape[-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), targets)
        top1 = topk_correct(outputs, targets, 1) * mask
        stats = {"count": jnp.sum(mask),
                 "top1_correct": jnp.sum(top1),
                 "top5_correct": jnp.sum(topk_correct(outputs, targets, k5) * mask),
                 "loss_sum": jnp.sum(ce * mask)}
        if self.config.get("per_class_metrics", False):  # (a bare config, as in unit tests: off)
            k = outputs.shape[-1]
            stats["class_count"] = jax.ops.segment_sum(mask, targets, num_segments=k)
            stats["class_top1_correct"] = jax.ops.segment_sum(top1.astype(jnp.int32), targets, num_segments=k)
        return stats


class _Subset:
    """The examples ``indices`` of a random-access source, as a random-access source (picklable)."""

    def __init__(self, source, indices: tuple[int, ...]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[i]]
