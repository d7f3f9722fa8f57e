"""Initialisation from loaded variables: exact copy, clear errors, explicit classifier re-init."""

import jax
import numpy as np
import pytest

from tests._train_helpers import register_tiny_model

register_tiny_model()
from configs import demo  # noqa: E402
from evit_jax.train import loop  # noqa: E402


def _experiment(data_dir, num_classes=-1, reinit=False):
    c = demo.get_config("smoke")
    c.data.data_dir = data_dir
    c.model.name = "tiny_test_cnn"
    c.model.num_classes = num_classes
    c.reinit_classifier = reinit
    e = loop.setup_experiment(c)
    e.config.unlock()
    e.config.init_from = "weights.pt"  # only named in error messages here
    return e


def _variables(experiment, seed):
    key = jax.random.key(seed)
    h, w = experiment.task.train_resolutions()[0]
    return jax.device_get(experiment.model.init({"params": key, "dropout": key}, np.zeros((1, h, w, 3), np.float32)))


def test_loaded_variables_are_copied_exactly(data_dir):
    e = _experiment(data_dir)
    loaded = _variables(e, 7)
    state = e.state_from_variables(e.init_state(), loaded)
    for a, b in zip(jax.tree_util.tree_leaves(loaded["params"]), jax.tree_util.tree_leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(state.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # EMA starts at the loaded weights


def test_other_number_of_classes_needs_reinit_flag(data_dir):
    source = _experiment(data_dir, num_classes=7)
    loaded = _variables(source, 3)
    e = _experiment(data_dir)  # 10 classes
    with pytest.raises(ValueError, match="reinit_classifier"):
        e.state_from_variables(e.init_state(), loaded)
    e = _experiment(data_dir, reinit=True)
    fresh = e.init_state()
    fresh_head = np.asarray(fresh.params["head"]["op_list_3"]["linear"]["kernel"])
    state = e.state_from_variables(fresh, loaded)
    np.testing.assert_array_equal(np.asarray(state.params["head"]["op_list_3"]["linear"]["kernel"]), fresh_head)
    np.testing.assert_array_equal(np.asarray(state.params["conv0"]["kernel"]), loaded["params"]["conv0"]["kernel"])


def test_mismatched_body_is_an_error_even_with_reinit(data_dir):
    e = _experiment(data_dir, reinit=True)
    loaded = _variables(e, 3)
    loaded["params"]["conv0"]["kernel"] = np.zeros((5, 5, 3, 8), np.float32)
    with pytest.raises(ValueError, match="conv0/kernel"):
        e.state_from_variables(e.init_state(), loaded)
