"""The mesh rule table and batch-layout helpers (no devices beyond the default one needed)."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from evit_jax.train import mesh as mesh_lib


class _FakeMesh:
    def __init__(self, data, fsdp):
        self.shape = {"data": data, "fsdp": fsdp}


def test_fsdp_rule_table():
    m = _FakeMesh(1, 4)
    assert mesh_lib.spec_for_shape((3, 3, 16, 32), m, "fsdp") == P(None, None, None, "fsdp")  # out channels
    assert mesh_lib.spec_for_shape((3, 3, 16, 30), m, "fsdp") == P(None, None, "fsdp", None)  # falls back to in
    assert mesh_lib.spec_for_shape((1280, 10), m, "fsdp") == P("fsdp", None)
    assert mesh_lib.spec_for_shape((3, 3, 3, 6), m, "fsdp") == P(None, None, None, None)  # nothing divides
    assert mesh_lib.spec_for_shape((64,), m, "fsdp") == P(None)  # vectors stay replicated
    assert mesh_lib.spec_for_shape((), m, "fsdp") == P()


def test_replicated_rule_table():
    m = _FakeMesh(4, 1)
    assert mesh_lib.spec_for_shape((3, 3, 16, 32), m, "replicated") == P(None, None, None, None)


def test_create_mesh_and_errors():
    mesh = mesh_lib.create_mesh("fsdp")
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.size == jax.device_count()
    with pytest.raises(ValueError, match="strategy"):
        mesh_lib.create_mesh("zero3")
    with pytest.raises(ValueError, match="fsdp_size"):
        mesh_lib.create_mesh("fsdp", fsdp_size=jax.device_count() + 1)
