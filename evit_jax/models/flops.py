"""Exact analytic multiply-accumulate (MAC) count of a model's forward pass.

The count walks the jaxpr of `model.apply` (traced with abstract inputs: no parameters are materialised
and nothing is compiled) and adds, for every convolution and every matrix product, the number of
multiply-accumulates it performs:

- convolution: output elements x (kernel height x kernel width x input channels per group);
- dot_general (linear layers, 1x1 convolutions written as matmuls, attention products):
  output elements x contracted size.

Matrix products whose operand is a constant of the trace (the fixed interpolation matrices of the bicubic
resize) are not counted, nor are elementwise ops (norms, activations, residual adds, pooling). This is the
convention of the EfficientViT papers ("convs, linears and attention matmuls"): it reproduces their MACs
columns (B1 0.52G at 224 px, seg-B0 Cityscapes 4.4G at 1024x2048, ...). The model is traced with
`conv_impl="lax"` so that every convolution is one primitive whatever the backend.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from evit_jax.models import create_model


def _subjaxprs(eqn) -> list:
    """The jaxprs nested in an equation's parameters (pjit, custom_jvp/vjp, control flow)."""
    found = []
    for value in eqn.params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, jax_core.ClosedJaxpr):
                found.append(v)
            elif isinstance(v, jax_core.Jaxpr):
                found.append(jax_core.ClosedJaxpr(v, ()))
    return found


def _conv_macs(eqn) -> int:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    # rhs_spec = (out feature dim, in feature dim, *spatial dims) as axis indices of the kernel.
    rhs_spec = dn.rhs_spec
    in_per_group = rhs.shape[rhs_spec[1]]
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    del lhs
    return math.prod(out.shape) * window * in_per_group


def _dot_macs(eqn) -> int:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    contracted = math.prod(lhs.shape[d] for d in lhs_contract)
    return math.prod(eqn.outvars[0].aval.shape) * contracted


def _count(jaxpr: jax_core.Jaxpr, constants: set) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "dot_general":
            if not any(isinstance(v, jax_core.Var) and v in constants for v in eqn.invars) and not any(
                isinstance(v, jax_core.Literal) for v in eqn.invars
            ):
                total += _dot_macs(eqn)
        for sub in _subjaxprs(eqn):
            # Inside a nested jaxpr, an input bound to a trace constant is a constant too.
            inner_constants = set(sub.jaxpr.constvars)
            for outer, inner in zip(eqn.invars, sub.jaxpr.invars):
                if isinstance(outer, jax_core.Var) and outer in constants:
                    inner_constants.add(inner)
            total += _count(sub.jaxpr, inner_constants)
        if name not in ("conv_general_dilated", "dot_general"):
            # Values computed only from constants (e.g. a cast of the resize matrix) stay constants.
            if eqn.invars and all(
                isinstance(v, jax_core.Literal) or (isinstance(v, jax_core.Var) and v in constants) for v in eqn.invars
            ):
                constants.update(eqn.outvars)
    return total


def count_macs_fn(fn, *args: Any) -> int:
    """MACs of `fn(*args)` (args may be `jax.ShapeDtypeStruct`s); see the module docstring for the rules."""
    closed = jax.make_jaxpr(fn)(*args)
    return _count(closed.jaxpr, set(closed.jaxpr.constvars))


def count_macs(name: str, height: int, width: int, batch: int = 1) -> int:
    """MACs of one forward pass of model `name` at `batch` x height x width x 3 (eval mode)."""
    model = create_model(name, conv_impl="lax")
    x = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    return count_macs_fn(lambda v, x: model.apply(v, x, train=False), variables, x)
