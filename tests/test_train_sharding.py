"""Sharding of the train step on 4 CPU devices (in a subprocess): sync-BN semantics, fsdp
really shards params/optimizer state/EMA, and fsdp == replicated == 1 device."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests import _train_helpers as h


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("data"))
    proc = subprocess.run([sys.executable, "-m", "tests._sharding_check", data_dir], cwd=h.REPO,
                          env=h.env_for(4), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_batchnorm_statistics_are_global(result):
    # Same global batch split over 4 devices or on 1: identical running statistics.
    assert result["sync_bn_max_diff"] < 1e-5
    assert result["bn_var_mean"] != pytest.approx(0.9, abs=1e-3)  # stats really moved


def test_replicated_four_devices_equals_one_device(result):
    np.testing.assert_allclose(result["losses"]["replicated4"], result["losses"]["one"], rtol=1e-6)
    assert result["param_diff_rep_vs_one"] < 1e-6
    assert result["bn_diff_rep_vs_one"] < 1e-5


def test_fsdp_matches_replicated(result):
    np.testing.assert_allclose(result["losses"]["fsdp4"], result["losses"]["replicated4"], rtol=1e-6)
    assert result["param_diff_fsdp_vs_rep"] < 1e-6


def test_fsdp_really_shards_params_optimizer_state_and_ema(result):
    for key in ("fsdp_param_specs", "fsdp_mu_specs", "fsdp_ema_specs"):
        specs = result[key]
        kernels = {k: v for k, v in specs.items() if "kernel" in k}
        assert kernels and all("fsdp" in v for v in kernels.values()), (key, specs)
    assert all("fsdp" not in v for v in result["rep_param_specs"].values())
    # The classifier kernel (16, 10): 10 does not divide by 4, so its input axis is split.
    assert result["fsdp_kernel_shape"] == [16, 10]
    assert result["fsdp_kernel_shard_shapes"] == [[4, 10]]


def test_fsdp_shards_nearly_all_of_efficientvit_b0(result):
    assert result["b0_sharded_fraction"] > 0.95


def test_compiling_for_a_tpu_slice_changes_nothing_on_cpu(result):
    """evit_jax.aot compiles the same Experiment for abstract TPU devices (libtpu) with conv_impl=lax;
    a CPU run in the same process afterwards gives the same losses, bit for bit, and the config it
    was given still says conv_impl=auto."""
    losses = result["evit_fsdp4_losses"]
    assert losses["after"] == losses["before_tpu_compile"], losses
    assert result["conv_impl_after_tpu_compile"] == {"tpu": "lax", "cpu": "auto"}
