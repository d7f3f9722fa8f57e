"""The serving computation of an ExportSpec as one JAX function: weights, preprocessing, layout.

`serving_function(spec, variables)` is what every format exports: the model with its BatchNorms folded
into the convolutions and `lax.conv` everywhere (portable: the CPU-only formulations of
evit_jax.models.ops would be baked into the graph otherwise). `serving_function(..., export=False)` is the
reference the checks compare against: the unfolded model with the default convolutions, as training and
evaluation run it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from evit_jax.export import preprocess
from evit_jax.export.spec import ExportError, ExportSpec
from evit_jax.models import create_model
from evit_jax.models.fold import folded_model
from evit_jax.models.random_weights import random_variables

JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BATCH_SYMBOL = "batch"


def load_variables(spec: ExportSpec) -> dict:
    """The weights of `spec`: its checkpoint (any file or directory `evit_jax.predict` reads), or random
    variables drawn from `spec.seed` when it has none."""
    if spec.checkpoint is None:
        model = create_model(spec.model, num_classes=spec.num_classes, numerics=spec.numerics)
        return random_variables(model, (1, spec.height, spec.width, 3), seed=spec.seed)
    from evit_jax.predict import PredictError, load_weights

    try:
        variables, _ = load_weights(spec.checkpoint, spec.model, spec.use_ema)
    except PredictError as err:
        raise ExportError(str(err)) from None
    return jax.tree.map(np.asarray, variables)


def num_classes_of(spec: ExportSpec, variables: dict) -> int | None:
    """The classifier size of the weights (a fine-tuned checkpoint may not have the zoo's default)."""
    if spec.task not in ("classification", "segmentation"):
        return spec.num_classes
    from evit_jax.predict import infer_num_classes

    return infer_num_classes(spec.task, variables["params"])


def input_signature(spec: ExportSpec) -> tuple[tuple[int | None, ...], Any]:
    """(shape with None for a dynamic batch, numpy dtype) of the serving input."""
    if spec.preprocess:
        return (spec.batch, spec.input_height, spec.input_width, 3), np.uint8
    if spec.layout == "nchw":
        return (spec.batch, 3, spec.height, spec.width), np.float32
    return (spec.batch, spec.height, spec.width, 3), np.float32


def serving_function(spec: ExportSpec, variables: dict, *, export: bool = True,
                     conv_impl: str = "auto") -> Callable[[jax.Array], jax.Array]:
    """x (input_signature) -> the output of spec.output_name; see the module docstring for `export`.

    conv_impl: the convolutions of the reference (export=False); exports always use "lax".
    """
    num_classes = num_classes_of(spec, variables)
    kwargs = dict(num_classes=num_classes, dtype=JNP_DTYPES[spec.dtype], numerics=spec.numerics)
    if export:
        model, weights = folded_model(spec.model, variables, conv_impl="lax", **kwargs)
        weights = jax.tree.map(lambda w: w.astype(kwargs["dtype"]) if np.issubdtype(w.dtype, np.floating) else w,
                               weights)
    else:
        model, weights = create_model(spec.model, conv_impl=conv_impl, **kwargs), variables
    task, size = spec.task, (spec.height, spec.width)

    def serve(x: jax.Array) -> jax.Array:
        if spec.preprocess and task == "classification":
            x = preprocess.classification_inputs(x, size, spec.crop_ratio)
        elif spec.preprocess:
            x = preprocess.segmentation_inputs(x, size)
        elif spec.layout == "nchw":
            x = jnp.transpose(x, (0, 2, 3, 1))
        y = model.apply(weights, x.astype(jnp.float32), train=False).astype(jnp.float32)
        if spec.preprocess and task == "segmentation":
            return preprocess.segmentation_labels(y, (spec.input_height, spec.input_width))
        if spec.layout == "nchw" and y.ndim == 4:
            return jnp.transpose(y, (0, 3, 1, 2))
        return y

    return serve


def abstract_input(spec: ExportSpec) -> jax.ShapeDtypeStruct:
    """The input as jax.export wants it: a symbolic batch dimension when spec.batch is None."""
    shape, dtype = input_signature(spec)
    if spec.batch is None:
        (batch,) = jax.export.symbolic_shape(BATCH_SYMBOL)
        shape = (batch,) + shape[1:]
    return jax.ShapeDtypeStruct(shape, dtype)
