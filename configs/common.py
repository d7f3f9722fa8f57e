"""Shared defaults of every run config. Each key is documented here; configs override values.

Configs are locked by ``config_flags`` in ``evit_jax.main``: a misspelt key in a config file
or on the command line (``--config.lr=1``) fails before anything runs.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
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
    c.model.dtype = "float32"          # compute dtype ("float32" | "bfloat16"); params stay float32
    c.model.conv_impl = "auto"         # create_model conv_impl: "auto" (fast CPU formulation on CPU), "lax", "fast"
    c.model.num_classes = -1           # -1: the dataset's number of classes

    c.data = ml_collections.ConfigDict()
    c.data.name = "imagenet2012"       # evit_jax.data.sources dataset name
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_sizes = (224,)        # per-batch training resolution drawn from this list
    c.data.eval_image_size = 224
    c.data.eval_crop_ratio = 1.0       # resize short side to ceil(size / ratio), centre crop size
    c.data.rrc_scale_min = 0.08        # RandomResizedCrop lower area bound
    c.data.hflip = True
    c.data.num_workers = 0             # grain worker processes per host (0: in-process)

    c.global_batch_size = 2048         # summed over all devices and hosts
    c.eval_batch_size = 512            # global

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 2.5e-4           # per 128 images (official: init_lr = base_lr * num_gpus at 128/gpu)
    c.optim.lr_reference_batch = 128   # peak lr = base_lr * global_batch_size / lr_reference_batch
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.no_decay_keys = ("norm", "bias")
    c.optim.grad_clip_value = 2.0      # clip gradients BY VALUE to [-v, v]; 0 disables

    c.num_epochs = 300                 # cosine decay epochs (after warmup)
    c.warmup_epochs = 20               # linear warmup epochs (the run is num_epochs + warmup_epochs long)
    c.total_steps = -1                 # >0 overrides the schedule length (warmup keeps its fraction)
    c.warmup_steps = -1                # >=0 overrides the warmup length in steps

    c.loss = ml_collections.ConfigDict()
    c.loss.bce = True                  # BCE-with-logits on smoothed targets (official); False: softmax CE
    c.loss.label_smoothing = 0.1

    c.mix = ml_collections.ConfigDict()
    c.mix.mixup_alpha = 0.0            # each step applies exactly ONE of mixup / cutmix (equal chance)
    c.mix.cutmix_alpha = 0.0           # alpha <= 0 disables that one; both <= 0 disables mixing

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
    # Locked: a config file assigning a key that does not exist here is an error.
    c.lock()
    return c
