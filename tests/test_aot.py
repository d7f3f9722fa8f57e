"""Planning a TPU run without a TPU (evit_jax.aot): the collective parser against hand-written HLO,
the slice table, the published dataset facts, the slice's host count, the batch search, and the
trainer's real train steps (classification with and without the EMA teacher, segmentation,
detection) compiled for a v5e:2x2 slice (libtpu) with their collectives checked against the
sharding rules (evit_jax/train/mesh.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from evit_jax.tools import chips
from evit_jax.train import hlo_stats
from tests import _train_helpers as h

_HLO = """
HloModule jit_step, is_scheduled=true

%fused (p0: f32[8,128]) -> f32[8,128] {
  %p0 = f32[8,128]{1,0:T(8,128)} parameter(0)
  ROOT %n = f32[8,128]{1,0:T(8,128)} negate(%p0)
}

%async_collective_fusion.1 (p1: f32[8,128]) -> f32[32,128] {
  %p1 = f32[8,128]{1,0} parameter(0)
  ROOT %reduce-scatter.9 = f32[2,128]{1,0} reduce-scatter(%p1), channel_id=3, dimensions={0}, to_apply=%add
}

ENTRY %main (a: f32[8,128], b: bf16[4,256]) -> f32[32,128] {
  %a = f32[8,128]{1,0:T(8,128)} parameter(0)
  %b = bf16[4,256]{1,0} parameter(1)
  %all-reduce.1 = (f32[8,128]{1,0:T(8,128)}, bf16[4,256]{1,0}) all-reduce(%a, %b), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %ag-start = (f32[8,128]{1,0}, f32[32,128]{1,0}) all-gather-start(%a), channel_id=2, dimensions={0}
  %ag-done = f32[32,128]{1,0} all-gather-done(%ag-start)
  %rs = f32[2,128]{1,0} reduce-scatter(%a), channel_id=3, dimensions={0}, to_apply=%add
  %cp = f32[8,128]{1,0} collective-permute(%a), channel_id=4, source_target_pairs={{0,1},{1,0}}
  ROOT %out = f32[32,128]{1,0} copy(%ag-done)
}
"""


def test_collectives_parsed_from_hlo_text():
    found = hlo_stats.collectives(_HLO)
    by_kind = {c.kind: c for c in found}
    # The reduce-scatter is written twice (an async collective fusion's clone first, same channel id).
    assert [c.kind for c in found] == ["reduce-scatter", "all-reduce", "all-gather", "collective-permute"]
    assert by_kind["all-reduce"].bytes == 8 * 128 * 4 + 4 * 256 * 2          # both operands of the tuple
    assert by_kind["all-gather"].bytes == 32 * 128 * 4                       # the gathered result, counted once
    assert by_kind["all-gather"].arrays == (("f32", (8, 128)), ("f32", (32, 128)))
    assert by_kind["reduce-scatter"].bytes == 8 * 128 * 4                    # its full operand
    assert by_kind["reduce-scatter"].name == "reduce-scatter.9"              # counted once
    assert by_kind["collective-permute"].bytes == 8 * 128 * 4
    summary = hlo_stats.summarize(found)
    assert summary["all-gather"] == {"count": 1, "bytes": 16384} and summary["all-to-all"]["count"] == 0


def test_roofline():
    r = hlo_stats.roofline_seconds(flops=197e12, bytes_accessed=819e9 * 2, peak_tflops=197.0, hbm_gb_per_s=819.0)
    assert r["compute_s"] == pytest.approx(1.0) and r["memory_s"] == pytest.approx(2.0)
    assert r["step_s"] == pytest.approx(2.0) and r["bound"] == "memory"


def test_slice_table():
    assert chips.find_slice("v4-32").topology == "v4:2x2x4" and chips.find_slice("v4-32").num_chips == 16
    assert chips.find_slice("v5e:16x16").name == "v5e-256"
    assert chips.find_slice("V5E-16").topology == "v5e:4x4"
    assert chips.chip_for("TPU v5").name == "TPU v5p" and chips.chip_for("TPU v5 lite").name == "TPU v5e"
    with pytest.raises(ValueError, match=r"unknown TPU topology 'v9-8'; known: v5e-1 \(v5e:1x1\)"):
        chips.find_slice("v9-8")


def test_find_max_batch_search():
    """The search ends at the largest fitting multiple of the step, with few probes, for a memory
    that is affine in the batch and for one that is not."""
    from evit_jax import aot

    capacity = 16 * aot.GiB

    class Config:
        global_batch_size = 128 * 16

    # The third memory flattens out below the capacity (the compiler changing its schedule) up to 1016.
    for fixed, per_image, bumpy, flat_until in ((1.0, 0.021, False, 0), (3.5, 0.07, True, 0), (1.0, 0.035, False, 1016)):
        calls = []

        def probe(config, b, fixed=fixed, per_image=per_image, bumpy=bumpy, flat_until=flat_until):
            calls.append(b)
            total = (fixed + per_image * b + (0.3 * (b % 48 == 0) if bumpy else 0.0)) * aot.GiB
            if flat_until:
                total = min(total, (14.6 + b * 1e-3) * aot.GiB) if b <= flat_until else None
            return total if total is not None and total <= capacity else None

        truth = max(b for b in range(8, 4096, 8) if probe(Config, b) is not None)
        calls.clear()
        result = aot.find_max_batch(Config, "v5e-16", step=8, probe=probe)
        assert result["max_batch_per_chip"] == truth, (result, truth)
        # Affine: the line's proposals, then one probe past the limit (it was 10 probes before the line's
        # proposal at lo became lo + step). Flat: doublings, then bisection down to the step.
        assert len(calls) <= (13 if flat_until else 6), calls
    with pytest.raises(aot.DoesNotFit, match="not even 8 images per chip fit"):
        aot.find_max_batch(Config, "v5e-16", step=8, probe=lambda config, b: None)


def test_unknown_topology_and_missing_libtpu_are_one_line(monkeypatch):
    from evit_jax import aot

    result = subprocess.run([sys.executable, "-m", "evit_jax.aot", "--config=configs/demo.py:smoke",
                             "--topology=v5e-3"], cwd=h.REPO, env=h.env_for(1), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert h.last_error_line(result).startswith("error: unknown TPU topology 'v5e-3'; known: v5e-1 (v5e:1x1)")
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs libtpu, which is not installed: pip install 'jax\[tpu\]=="):
        aot.topology_devices("v5e-16")


def test_published_facts_need_no_data(tmp_path):
    """The trainer's setup runs on published facts with an empty data_dir: ImageNet's schedule length,
    Cityscapes' fixed eval size, ADE20K's nominal eval input; a dataset without facts says what to do."""
    import jax

    from configs import ade20k, cityscapes, imagenet
    from evit_jax.tasks import get_task
    from evit_jax.train import loop

    devices = jax.devices()[:1]
    config = imagenet.get_config("b0").copy_and_resolve_references()
    config.data.data_dir = str(tmp_path)
    e = loop.setup_experiment(config, devices, published_facts=True)
    assert e.task.num_classes == 1000
    assert e.total_steps == round(320 * 1281167 / 2048)
    for module, keys in ((cityscapes, [((1024, 2048), (1024, 2048))]), (ade20k, [((512, 512), (512, 512))])):
        config = module.get_config("b1").copy_and_resolve_references()
        config.data.data_dir = str(tmp_path)
        task = get_task(config)
        task.use_published_facts()
        task.check_data()
        assert task.eval_batch_keys() == keys and task.num_train_examples() == task.info.split_sizes["train"]
    assert not os.listdir(tmp_path)
    config = imagenet.get_config("b0").copy_and_resolve_references()
    config.data.name = "my_flowers"
    with pytest.raises(ValueError, match="has no published facts here .* --config.model.num_classes=N"):
        loop.setup_experiment(config, devices, published_facts=True)
    config.model.num_classes = 5
    config.total_steps = 10
    e = loop.setup_experiment(config, devices, published_facts=True)
    assert e.task.num_classes == 5 and e.total_steps == 10


def test_slice_hosts_count_for_the_batch():
    """A v5e:16x16 has 64 hosts: the experiment's per-process batch divides by 64, not by this
    machine's one process."""
    from configs import imagenet
    from evit_jax import aot
    from evit_jax.train import loop
    from evit_jax.train import mesh as mesh_lib

    _, devices = aot.topology_devices("v5e-256")
    assert len({d.process_index for d in devices}) == 64
    config = imagenet.get_config("b0").copy_and_resolve_references()
    e = loop.setup_experiment(config, devices, published_facts=True)
    assert mesh_lib.process_count(e.mesh) == 64 and e.local_batch_size(2048) == 32


# The compiled steps: tiny models (the EfficientViT ones take minutes to compile for a TPU) with
# enough channels for XLA to keep whole collectives (it decomposes very small ones into permutes).
def register_test_models() -> None:
    """Models ``aot_test_cls`` (10 classes) and ``aot_test_seg`` (7 classes, stride-8 logits)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from evit_jax.models import ModelSpec, register_model

    class Net(nn.Module):
        num_classes: int
        dtype: object
        dense_head: bool

        @nn.compact
        def __call__(self, x, train: bool = False):
            for i, width in enumerate((64, 256)):
                x = nn.Conv(width, (3, 3), strides=2, use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
                x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"norm{i}")(x)
                x = nn.relu(x)
            # A depthwise conv, as in every MBConv: with its kernel sharded over channels, XLA re-lays
            # the activation from batch- to channel-sharded unless the kernel is gathered first.
            x = nn.Conv(256, (3, 3), feature_group_count=256, use_bias=False, dtype=self.dtype, name="depthwise")(x)
            if self.dense_head:
                return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x.mean(axis=(1, 2))).astype(jnp.float32)
            x = nn.Conv(256, (3, 3), strides=2, use_bias=False, dtype=self.dtype, name="conv2")(x)
            return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head")(x).astype(jnp.float32)

    register_model(ModelSpec("aot_test_cls", "classification", "tiny", 10), lambda o: Net(o.classes(), o.cfg.dtype, True))
    register_model(ModelSpec("aot_test_seg", "segmentation", "tiny", 7), lambda o: Net(o.classes(), o.cfg.dtype, False))


_COMPILE = r"""
import json
from evit_jax import aot
import jax
from configs import demo, demo_det, demo_seg
from evit_jax.train import hlo_stats, loop
from tests._train_helpers import TINY_DET, register_tiny_model
from tests.test_aot import register_test_models

register_test_models()
register_tiny_model()
_, devices = aot.topology_devices("v5e:2x2")
out = {}
teacher = demo.get_config("smoke")
teacher.mesa.ratio = 2.0  # the EMA teacher forward of L1-L3's recipe
for task, base, model, strategies in (
        ("cls", demo.get_config("smoke"), "aot_test_cls", ("replicated", "fsdp")),
        ("seg", demo_seg.get_config("smoke"), "aot_test_seg", ("replicated", "fsdp")),
        ("det", demo_det.get_config("smoke"), TINY_DET, ("replicated", "fsdp")),
        ("cls_teacher", teacher, "aot_test_cls", ("fsdp",))):
    for strategy in strategies:
        config = base.copy_and_resolve_references()
        config.model.name, config.sharding.strategy = model, strategy
        config.global_batch_size = config.eval_batch_size = 16
        e = loop.setup_experiment(config, devices, published_facts=True)
        compiled = e.compile_train_step(e.task.train_resolutions()[0])
        params = [{"shape": list(s.shape), "sharded": "fsdp" in tuple(sh.spec)}
                  for s, sh in zip(jax.tree_util.tree_leaves(e.abstract_state.params),
                                   jax.tree_util.tree_leaves(e.state_shardings.params))]
        found = [{"kind": c.kind, "bytes": c.bytes, "arrays": c.arrays}
                 for c in hlo_stats.collectives(compiled.as_text())]
        out[f"{task}/{strategy}"] = {"params": params, "collectives": found, "batch": 16}
print(json.dumps(out))
"""

_CLI = r"""
import sys
from tests.test_aot import register_test_models

register_test_models()
from evit_jax import aot

sys.argv = ["aot"] + sys.argv[1:]
aot.run()
"""


def test_cli_report_and_does_not_fit(tmp_path):
    """The command prints each step and writes the JSON report; a batch too large for the chip is one
    error line naming what to change; an eval batch matters only when the eval step is compiled."""
    out = tmp_path / "report.json"
    args = ["--config=configs/demo.py:smoke", "--config.model.name=aot_test_cls", "--topology=v5e-4"]
    ok = subprocess.run([sys.executable, "-c", _CLI, *args, "--batch_per_chip=8", "--eval_batch_per_chip=8",
                         f"--out={out}"], cwd=h.REPO, env=h.env_for(1), capture_output=True, text=True, timeout=900)
    assert ok.returncode == 0, ok.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [s["step"] for s in report["steps"]] == ["train step 32x32", "eval step 32x32"]
    assert report["chips"] == 4 and report["hosts"] == 1 and all(s["fits"] for s in report["steps"])
    assert "estimated (roofline)" in ok.stdout and "images/s per chip" in ok.stdout
    # With --noeval an eval batch that does not divide the chips (6 on 4) is no reason to stop.
    big = subprocess.run([sys.executable, "-c", _CLI, *args, "--batch_per_chip=262144", "--noeval",
                          "--config.eval_batch_size=6"], cwd=h.REPO, env=h.env_for(1), capture_output=True,
                         text=True, timeout=900)
    assert big.returncode != 0
    line = h.last_error_line(big)
    assert line.startswith("error: train step 32x32") and "262144 images per chip" in line, big.stderr[-2000:]
    assert "--config.sharding.strategy=fsdp" in line and "--config.model.dtype=bfloat16" in line


@pytest.fixture(scope="module")
def compiled_steps():
    result = subprocess.run([sys.executable, "-c", _COMPILE], cwd=h.REPO, env=h.env_for(1), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _size(dims) -> int:
    return int(np.prod(dims)) if len(dims) else 1


@pytest.mark.parametrize("task", ["cls", "seg", "det"])
def test_data_parallel_step_reduces_gradients_only(compiled_steps, task):
    """Data parallel: every collective is an all-reduce, and they carry the float32 gradients of all
    parameters (plus the tiny BatchNorm statistics and metrics): no gather of images or activations."""
    step = compiled_steps[f"{task}/replicated"]
    kinds = {c["kind"] for c in step["collectives"]}
    assert kinds == {"all-reduce"}, kinds
    reduced = sum(c["bytes"] for c in step["collectives"])
    gradients = 4 * sum(_size(p["shape"]) for p in step["params"])
    assert gradients <= reduced <= gradients + 64 * 1024, (reduced, gradients)


@pytest.mark.parametrize("task", ["cls", "seg", "det", "cls_teacher"])
def test_fsdp_step_gathers_the_sharded_parameters(compiled_steps, task):
    """FSDP: every parameter the rules shard is all-gathered whole (in its compute dtype); every
    all-gather is one of them (none of images or activations) and no activation is re-laid across
    devices (no all-to-all: the EMA teacher of ``cls_teacher`` read the sharded EMA weights and moved
    its activations before its forward gathered them too); the gradients of all parameters are
    reduced (all-reduce or reduce-scatter)."""
    step = compiled_steps[f"{task}/fsdp"]
    kinds = {c["kind"] for c in step["collectives"]}
    assert kinds <= {"all-gather", "all-reduce", "reduce-scatter"}, kinds
    sharded = [p for p in step["params"] if p["sharded"]]
    assert sharded, step["params"]
    gathered = [_size(dims) for c in step["collectives"] if c["kind"] == "all-gather" for _, dims in c["arrays"]]
    # XLA rewrites the all-gather of a parameter of a few elements (the detector's 8-input objectness
    # kernels) as an all-reduce of its zero-padded shard, combined with other small all-reduces.
    reduced_arrays = [_size(dims) for c in step["collectives"] if c["kind"] == "all-reduce" for _, dims in c["arrays"]]
    missing = [p["shape"] for p in sharded if _size(p["shape"]) not in gathered
               and not (_size(p["shape"]) <= 64 and _size(p["shape"]) in reduced_arrays)]
    assert not missing, (missing, gathered)
    param_sizes = {_size(p["shape"]) for p in step["params"]}
    shard_sizes = {s // 4 for s in param_sizes}
    for size in gathered:  # whole parameters, or the local shard an async gather starts from
        assert size in param_sizes | shard_sizes, (size, sorted(param_sizes))
    reduced = sum(c["bytes"] for c in step["collectives"] if c["kind"] in ("all-reduce", "reduce-scatter"))
    assert reduced >= 4 * sum(_size(p["shape"]) for p in step["params"])
