"""Run with 4 CPU devices (tests/test_train_sharding.py): sync-BN, fsdp vs replicated vs 1 device, and
a CPU run unchanged by compiling for a TPU slice in the same process."""

import json
import sys

import jax
import numpy as np

from tests._train_helpers import TINY_EVIT, register_tiny_model

register_tiny_model()
from configs import demo  # noqa: E402
from evit_jax.train import loop  # noqa: E402

DATA_DIR = sys.argv[1]
STEPS = 3


def config(strategy, model="tiny_test_cnn"):
    c = demo.get_config("smoke")
    c.data.data_dir = DATA_DIR
    c.model.name = model
    c.sharding.strategy = strategy
    c.global_batch_size = 8
    c.mix.mixup_alpha = 0.4  # exercise the on-device mixing under sharding too
    c.mix.cutmix_alpha = 0.4
    return c


def train(strategy, devices, model="tiny_test_cnn"):
    e = loop.setup_experiment(config(strategy, model), devices=devices)
    # Mixing pairs examples within blocks of the batch, one per device: one device reproduces the
    # 4-device pairing by using 4 blocks.
    e.task.batch_shards = 4
    state = e.init_state()
    steps = e.compile_train_steps()
    it = e.task.train_iterator(0, 8)
    losses = []
    for _ in range(STEPS):
        local = next(it)
        res = e.task.batch_resolution(local)
        state, metrics = steps[res](state, e.global_batch(local, e.task.train_batch_spec(8, res)))
        losses.append(float(metrics["loss"]))
    return e, state, losses


def sharded_axes(tree):
    return {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def sync_bn(devices):
    """BatchNorm statistics of one train-mode forward on a batch sharded over ``devices``."""
    e = loop.setup_experiment(config("replicated"), devices=devices)
    state = e.init_state()
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32) * 3 + 1
    from evit_jax.train import mesh as mesh_lib
    xs = jax.device_put(x, mesh_lib.batch_sharding(e.mesh))

    @jax.jit
    def fwd(variables, x):
        _, mutated = e.model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
        return mutated["batch_stats"]

    return jax.device_get(fwd({"params": state.params, "batch_stats": state.batch_stats}, xs))


def main():
    devices = jax.devices()
    assert len(devices) == 4, devices
    out = {}
    bn4, bn1 = sync_bn(devices), sync_bn(devices[:1])
    out["sync_bn_max_diff"] = max(float(np.max(np.abs(a - b))) for a, b in
                                  zip(jax.tree_util.tree_leaves(bn4), jax.tree_util.tree_leaves(bn1)))
    out["bn_var_mean"] = float(np.mean(jax.tree_util.tree_leaves(bn4)[1]))

    _, s1, l1 = train("replicated", devices[:1])
    _, s4, l4 = train("replicated", devices)
    ef, sf, lf = train("fsdp", devices)
    out["losses"] = {"one": l1, "replicated4": l4, "fsdp4": lf}
    out["param_diff_rep_vs_one"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                                       zip(jax.tree_util.tree_leaves(s4.params), jax.tree_util.tree_leaves(s1.params)))
    out["param_diff_fsdp_vs_rep"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                                        zip(jax.tree_util.tree_leaves(sf.params), jax.tree_util.tree_leaves(s4.params)))
    out["bn_diff_rep_vs_one"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                                    zip(jax.tree_util.tree_leaves(s4.batch_stats), jax.tree_util.tree_leaves(s1.batch_stats)))
    out["fsdp_param_specs"] = sharded_axes(sf.params)
    out["fsdp_mu_specs"] = sharded_axes(sf.opt_state[1][0].mu)
    out["fsdp_ema_specs"] = sharded_axes(sf.ema_params)
    out["rep_param_specs"] = sharded_axes(s4.params)
    kernel = sf.params["head"]["op_list_3"]["linear"]["kernel"]
    out["fsdp_kernel_shard_shapes"] = sorted({tuple(s.data.shape) for s in kernel.addressable_shards})
    out["fsdp_kernel_shape"] = list(kernel.shape)

    # Compiling the experiment for a TPU slice in this process, as evit_jax.aot does, leaves the CPU
    # run after it unchanged: same losses, bit for bit (whatever global state the TPU compile touches),
    # and the caller's config keeps its conv_impl (aot.for_tpu sets lax on a copy; the tiny model pins
    # lax itself, so the losses alone would not show a leak of that setting).
    from evit_jax import aot
    before = train("fsdp", devices, TINY_EVIT)[2]
    _, tpu_devices = aot.topology_devices("v5e:2x2")
    cpu_config = config("fsdp", TINY_EVIT)
    cpu_config.model.conv_impl = "auto"  # the smoke config pins lax; auto is what for_tpu must not change
    tpu = loop.setup_experiment(aot.for_tpu(cpu_config), devices=tpu_devices)
    tpu.compile_train_step(tpu.task.train_resolutions()[0])
    out["evit_fsdp4_losses"] = {"before_tpu_compile": before, "after": train("fsdp", devices, TINY_EVIT)[2]}
    out["conv_impl_after_tpu_compile"] = {"tpu": tpu.config.model.conv_impl, "cpu": cpu_config.model.conv_impl}

    # The real model: which EfficientViT-B0 parameters fsdp shards (abstract, nothing compiled).
    eb0 = loop.setup_experiment(config("fsdp", "efficientvit_b0"), devices=devices)
    specs = jax.tree_util.tree_leaves_with_path(eb0.state_shardings.params)
    shapes = dict((jax.tree_util.keystr(p), x.shape) for p, x in jax.tree_util.tree_leaves_with_path(eb0.abstract_state.params))
    sharded = [(jax.tree_util.keystr(p), s.spec) for p, s in specs if any(a is not None for a in s.spec)]
    size = lambda k: int(np.prod(shapes[k]))
    total = sum(size(k) for k in shapes)
    out["b0_sharded_fraction"] = sum(size(k) for k, _ in sharded) / total
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
