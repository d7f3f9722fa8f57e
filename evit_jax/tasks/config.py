"""Every run-config key, with its default and meaning: the common keys and each task's own.

Run configs (``configs/*.py``, ``get_config(arg)``) start from :func:`base_config(task)` and
override values. The result is locked: a key that does not exist for that task is an error, in a
config file or on the command line (``--config.optim.lrr=1``), before anything runs. A task reads
exactly the common keys plus its own section (:data:`TASK_KEYS`); :func:`check_keys` rejects a
config carrying keys its task would ignore. A new task adds its keys here.

Light on purpose (no jax): config files import it while the command line is parsed.
"""

from __future__ import annotations

import ml_collections


def _common() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classification"          # evit_jax.tasks.TASKS key
    c.mode = "train"                   # "train" | "eval"
    c.seed = 0                         # fixes params init, data order, augmentations, dropout
    c.init_from = ""                   # converted PyTorch weights (.pt/.pth/.safetensors) or an Orbax variables dir
    c.init_use_ema = False             # read the EMA weights of an official checkpoint in init_from
    c.reinit_classifier = False        # fine-tuning: re-initialise the final classifier when num_classes differs

    c.model = ml_collections.ConfigDict()
    c.model.name = "efficientvit_b1"   # evit_jax.models.create_model name
    c.model.attention = "relu_linear"  # LiteMLA attention variant (create_model override)
    c.model.drop_path_rate = 0.0       # stochastic depth of identity-residual blocks (linear in depth)
    c.model.drop_path_skip = 0         # first blocks without stochastic depth (official: L1 2, L2/L3 3)
    c.model.drop_path_scheduled = False  # drop probability x training progress (official scheduled drop path)
    c.model.dtype = "float32"          # compute dtype ("float32" | "bfloat16"); params stay float32
    c.model.conv_impl = "auto"         # create_model conv_impl: "auto" (fast CPU formulation on CPU), "lax", "fast"
    c.model.num_classes = -1           # -1: the dataset's number of classes

    c.data = ml_collections.ConfigDict()
    c.data.name = "imagenet2012"       # evit_jax.data.sources dataset name (built-in or prepared under a name)
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_sizes = (224,)        # training resolution per batch, drawn from this list (int or (h, w))
    c.data.hflip = True                # random horizontal flip in training
    c.data.num_workers = 0             # grain worker processes per host (0: in-process)

    c.global_batch_size = 2048         # summed over all devices and hosts
    c.eval_batch_size = 512            # global

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"             # "adamw" (b1, b2, eps) | "sgd" (momentum, nesterov; PyTorch's SGD, weight decay as L2)
    c.optim.base_lr = 2.5e-4           # per lr_reference_batch images (official: init_lr = base_lr * num_gpus at 128/gpu)
    c.optim.lr_reference_batch = 128   # peak lr = base_lr * global_batch_size / lr_reference_batch
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9             # sgd only
    c.optim.nesterov = True            # sgd only
    c.optim.weight_decay = 0.1
    c.optim.no_decay_keys = ("norm", "bias")
    c.optim.grad_clip_value = 2.0      # clip gradients BY VALUE to [-v, v]; 0 disables

    c.num_epochs = 300                 # cosine decay epochs (after warmup)
    c.warmup_epochs = 20               # linear warmup epochs (the run is num_epochs + warmup_epochs long)
    c.total_steps = -1                 # >0 overrides the schedule length (warmup keeps its fraction)
    c.warmup_steps = -1                # >=0 overrides the warmup length in steps

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.9998               # decay(t) = decay * (1 - exp(-t / warmup_steps))
    c.ema.warmup_steps = 2000.0

    c.sharding = ml_collections.ConfigDict()
    c.sharding.strategy = "replicated" # "replicated" | "fsdp"
    c.sharding.fsdp_size = -1          # devices on the fsdp axis (-1: all)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000    # <=0: only at the end (and on preemption)
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log_every_steps = 50
    c.eval_every_steps = 5000          # <=0: only at the end
    c.eval_ema = True                  # also evaluate the EMA weights
    c.transfer_guard = True            # disallow implicit host<->device transfers in the loop
    c.tensorboard = True
    return c


def _classification(c: ml_collections.ConfigDict) -> None:
    c.data.eval_image_size = 224
    c.data.eval_crop_ratio = 1.0       # resize short side to ceil(size / ratio), centre crop size
    c.data.rrc_scale_min = 0.08        # RandomResizedCrop lower area bound
    c.data.randaugment = ()            # (n, m): timm's rand-n{n}-m{m}-mstd1.0-inc1 (evit_jax/data/randaugment.py); (): off
    c.data.erasing_prob = 0.0          # random erasing probability (timm's defaults, const mode); 0: off

    c.loss = ml_collections.ConfigDict()
    c.loss.bce = True                  # BCE-with-logits on smoothed targets (official); False: softmax CE
    c.loss.label_smoothing = 0.1

    c.mix = ml_collections.ConfigDict()
    c.mix.mixup_alpha = 0.0            # each step applies exactly ONE of mixup / cutmix (equal chance)
    c.mix.cutmix_alpha = 0.0           # alpha <= 0 disables that one; both <= 0 disables mixing
    c.mix.partner_blocks = 0           # partners drawn within this many equal blocks of the global batch; 0: one
                                       # block per device (as the official trainer mixes each GPU's batch). Fix it
                                       # (a multiple of the device count) to train alike on any layout.

    # MESA (official L recipe): once the training progress reaches `threshold`, add
    # ratio x loss(outputs, sigmoid(EMA model's outputs on the same mixed batch)).
    c.mesa = ml_collections.ConfigDict()
    c.mesa.ratio = 0.0                 # 0: off (official L1 2.0, L2 2.75, L3 3.5)
    c.mesa.threshold = 0.25

    # BatchNorm re-estimation before every evaluation (official reset_bn): the evaluated weights' BN
    # statistics recomputed from a fixed subset of the train split (train transform at the eval size).
    c.reset_bn = ml_collections.ConfigDict()
    c.reset_bn.num_images = 0          # 0: off (official 16000; capped at the train split's size)
    c.reset_bn.global_batch_size = 1600  # official 100 per GPU x 16 GPUs (the global batch 2048 runs)

    c.per_class_metrics = False        # also eval/top1/<class name> per class (and a per-class table in the log)


def _segmentation(c: ml_collections.ConfigDict) -> None:
    c.data.eval_split = "validation"
    # Train: per-batch crop (h, w) drawn from data.image_sizes, after a random rescale.
    c.data.scale_range = (0.5, 2.0)    # random rescale factor of the (base-fitted) image
    c.data.base_size = (2048, 1024)    # (long, short) box the image is fitted into before scaling; () = own size
    c.data.photometric = True          # brightness/contrast/saturation/hue jitter (mmseg ranges)
    # Eval (official protocol, evit_jax.data.seg_transforms.eval_input_size).
    c.data.eval_protocol = "cityscapes"  # "cityscapes" (crop x 2crop) | "ade20k" (short side crop, long ceil32) | "none"
    c.data.eval_crop_size = 1024

    c.loss = ml_collections.ConfigDict()
    c.loss.upsample = "bilinear"       # logits -> crop size for the loss: "bilinear" | "bicubic"


def _detection(c: ml_collections.ConfigDict) -> None:
    # Train (host, evit_jax.data.det_transforms.DetectionTrainTransform): YOLOX's augmentation at a per-batch
    # size drawn from data.image_sizes (multi-scale training); flip with data.hflip.
    c.data.max_boxes = 120             # ground-truth boxes per training image (YOLOX max_labels); more are dropped
    c.data.mosaic_prob = 1.0           # YOLOX COCO recipe: mosaic on every image ...
    c.data.mixup_prob = 1.0            # ... and mixup after every mosaic
    c.data.hsv_prob = 1.0
    c.data.degrees = 10.0              # mosaic's random affine: rotation +-degrees
    c.data.translate = 0.1             # translation +- this share of the size
    c.data.shear = 2.0                 # shear +- degrees
    c.data.mosaic_scale = (0.1, 2.0)   # scale range of the mosaic's affine
    c.data.mixup_scale = (0.5, 1.5)
    c.data.scale_range = (1.0, 1.0)    # scale jitter of the non-mosaic letterbox ((1, 1): YOLOX's plain letterbox)
    c.data.no_aug_epochs = 15.0        # the last epochs: no mosaic / mixup, L1 box term on (YOLOX); 0: never
    # Eval (host): YOLOX's letterbox to a square of this size; detections mapped back to the original pixels.
    c.data.eval_image_size = 640

    c.loss = ml_collections.ConfigDict()
    c.loss.assigner = "yolox_0.3.0"    # SimOTA version: "yolox_0.3.0" (the paper's time) | "yolox_2023"

    # Evaluation post-processing (evit_jax.tasks.det_postprocess.PostprocessConfig); defaults: YOLOX's COCO eval.
    c.postprocess = ml_collections.ConfigDict()
    c.postprocess.score_threshold = 0.01   # YOLOX test_conf
    c.postprocess.iou_threshold = 0.65     # class-aware NMS (YOLOX nmsthre)
    c.postprocess.max_detections = 100     # per image (COCO's maxDets)
    c.postprocess.pre_nms_top_k = 1000     # highest-scoring points entering NMS (static shapes)


# task -> function adding its keys to the common ones.
_TASK_SECTIONS = {
    "classification": _classification,
    "segmentation": _segmentation,
    "detection": _detection,
}


def _flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys |= _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def tasks() -> list[str]:
    return sorted(_TASK_SECTIONS)


def base_config(task: str) -> ml_collections.ConfigDict:
    """The common keys plus ``task``'s own, with their defaults; locked."""
    if task not in _TASK_SECTIONS:
        raise ValueError(f"unknown task {task!r}; use one of {tasks()}.")
    c = _common()
    c.task = task
    _TASK_SECTIONS[task](c)
    c.lock()
    return c


def task_keys(task: str) -> set[str]:
    """Every flattened key (``data.eval_protocol``) a run config of ``task`` has."""
    return _flat_keys(base_config(task))


def schedule_lengths(config: ml_collections.ConfigDict, train_examples: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) of a run. Default: (num_epochs + warmup_epochs) epochs of the train
    split; ``total_steps`` > 0 overrides the length (warmup keeps its fraction of the run);
    ``warmup_steps`` >= 0 overrides the warmup. The loop schedules with it; a task that changes its
    behaviour at a point of the run (detection's last no-augmentation epochs) places it with it."""
    epochs = config.num_epochs + config.warmup_epochs
    if config.total_steps > 0:
        total = int(config.total_steps)
    else:
        total = int(round(epochs * train_examples / config.global_batch_size))
    if config.warmup_steps >= 0:
        warmup = int(config.warmup_steps)
    else:
        warmup = int(round(total * config.warmup_epochs / epochs)) if epochs else 0
    if total <= 0:
        raise ValueError(f"the schedule has {total} steps; set --config.total_steps or num_epochs.")
    if warmup > total:
        raise ValueError(f"warmup_steps={warmup} exceeds total_steps={total}.")
    return total, warmup


def check_keys(config: ml_collections.ConfigDict) -> None:
    """One clear error when ``config`` has keys its task does not read, or lacks keys it reads."""
    task = config.task
    expected = task_keys(task)
    present = _flat_keys(config)
    extra, missing = sorted(present - expected), sorted(expected - present)
    if extra:
        raise ValueError(f"config keys {', '.join(extra)} are not read by the {task} task; remove them "
                         f"(build the config from evit_jax.tasks.config.base_config({task!r})).")
    if missing:
        raise ValueError(f"the config lacks {', '.join(missing)}, which the {task} task reads "
                         f"(build it from evit_jax.tasks.config.base_config({task!r})).")
