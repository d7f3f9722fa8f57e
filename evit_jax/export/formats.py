"""Writers and loaders of the four serving formats.

Each writer takes the serving function (evit_jax/export/serving.py), the ExportSpec and a path that does
not exist yet; each loader returns a numpy-in, numpy-out callable running the artifact in its own runtime:

- stablehlo: `jax.export` (symbolic batch when dynamic), serialized; loaded with `jax.export.deserialize`
  and called from JAX, no evit_jax code involved.
- onnx: jax2onnx at `spec.opset`, shape operands made constant (onnx_graph.py); run with onnxruntime.
- savedmodel: `jax2tf.convert` (native serialization: the model is one XlaCallModule op) in a
  `tf.saved_model` with a `serving_default` signature; run with TensorFlow.
- tflite: the TFLite converter on that SavedModel (it lowers the StableHLO inside to TFLite builtins; no
  extra flags needed); run with the TFLite interpreter.

TensorFlow, jax2onnx and onnxruntime are imported only here and only when their format is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from evit_jax.export.spec import ExportError, ExportSpec
from evit_jax.export.serving import BATCH_SYMBOL, abstract_input, input_signature

Runner = Callable[[np.ndarray], np.ndarray]
INPUT_NAME = "images"
INSTALL_HINT = "pip install -r requirements-export.txt"


def _require(module: str, fmt: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ExportError(f"--format {fmt} needs the {module.split('.')[0]} package: {INSTALL_HINT}") from None


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Converter chatter (jax2onnx plugin imports, onnx_ir, TF) down to errors while converting."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)


def tensorflow():
    """TensorFlow, imported on first use with its C++ logging quietened (never at package import)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return _require("tensorflow", "savedmodel/tflite")


# ------------------------------------------------------------------------------------------ StableHLO
def write_stablehlo(fn: Callable, spec: ExportSpec, path: Path) -> None:
    exported = jax.export.export(jax.jit(fn), platforms=spec.platforms)(abstract_input(spec))
    path.write_bytes(exported.serialize())


def load_stablehlo(path: Path, spec: ExportSpec) -> Runner:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return lambda x: np.asarray(exported.call(x))


# ------------------------------------------------------------------------------------------------ ONNX
def onnx_model(fn: Callable, spec: ExportSpec):
    """The ONNX ModelProto of the serving function (checked by onnx.checker)."""
    jax2onnx = _require("jax2onnx", "onnx")
    onnx = _require("onnx", "onnx")
    from evit_jax.export.onnx_graph import static_shape_graph

    with _quiet("jax2onnx", "onnx_ir", "onnxscript"):
        model = jax2onnx.to_onnx(fn, [abstract_input(spec)],
                                 opset=spec.opset, model_name=spec.model, input_names=[INPUT_NAME],
                                 output_names=[spec.output_name])
    model = static_shape_graph(model)
    onnx.checker.check_model(model)
    return model


def write_onnx(fn: Callable, spec: ExportSpec, path: Path) -> None:
    onnx = _require("onnx", "onnx")
    onnx.save(onnx_model(fn, spec), str(path))


def onnx_session(path: Path, threads: int | None = None):
    ort = _require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx(path: Path, spec: ExportSpec) -> Runner:
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


# ------------------------------------------------------------------------------ SavedModel and TFLite
def _tf_module(fn: Callable, spec: ExportSpec, platforms: tuple[str, ...]):
    tf = tensorflow()
    from jax.experimental import jax2tf

    shape, dtype = input_signature(spec)
    polymorphic = None if spec.batch else [f"({BATCH_SYMBOL}, {', '.join(str(d) for d in shape[1:])})"]
    converted = jax2tf.convert(fn, polymorphic_shapes=polymorphic, with_gradient=False,
                               native_serialization_platforms=platforms)
    module = tf.Module()
    module.serve = tf.function(lambda x: {spec.output_name: converted(x)}, autograph=False,
                               input_signature=[tf.TensorSpec(shape, tf.as_dtype(dtype), name=INPUT_NAME)])
    return tf, module


def _save_tf(fn: Callable, spec: ExportSpec, path: Path, platforms: tuple[str, ...]) -> None:
    tf, module = _tf_module(fn, spec, platforms)
    with _quiet("tensorflow", "absl"):
        tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve.get_concrete_function()})


def write_savedmodel(fn: Callable, spec: ExportSpec, path: Path) -> None:
    _save_tf(fn, spec, path, tuple(p for p in spec.platforms if p in ("cpu", "cuda", "tpu")))


def load_savedmodel(path: Path, spec: ExportSpec) -> Runner:
    tf = tensorflow()
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda x: signature(**{INPUT_NAME: tf.constant(x)})[spec.output_name].numpy()


def write_tflite(fn: Callable, spec: ExportSpec, path: Path) -> None:
    tf = tensorflow()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        saved = Path(tmp) / "savedmodel"
        _save_tf(fn, spec, saved, ("cpu",))  # the converter reads a single-platform module
        with _quiet("tensorflow", "absl"):
            converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
            try:
                flatbuffer = converter.convert()
            except Exception as err:  # noqa: BLE001 - the converter raises many kinds; report its first line
                raise ExportError(f"TFLite conversion failed: {str(err).strip().splitlines()[0]}") from err
    path.write_bytes(flatbuffer)


def tflite_interpreter(path: Path, threads: int | None = None):
    tf = tensorflow()
    with _quiet("tensorflow"):
        return tf.lite.Interpreter(model_path=str(path), num_threads=threads)


def load_tflite(path: Path, spec: ExportSpec) -> Runner:
    interpreter = tflite_interpreter(path)
    inp = interpreter.get_input_details()[0]
    out_index = interpreter.get_output_details()[0]["index"]
    state = {"shape": None}

    def run(x: np.ndarray) -> np.ndarray:
        if state["shape"] != x.shape:
            if spec.batch is not None and x.shape[0] != spec.batch:
                raise ExportError(f"this TFLite model takes batch {spec.batch}, got {x.shape[0]}")
            interpreter.resize_tensor_input(inp["index"], list(x.shape))
            interpreter.allocate_tensors()
            state["shape"] = x.shape
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(out_index).copy()

    return run


WRITERS = {"stablehlo": write_stablehlo, "onnx": write_onnx, "savedmodel": write_savedmodel, "tflite": write_tflite}
LOADERS = {"stablehlo": load_stablehlo, "onnx": load_onnx, "savedmodel": load_savedmodel, "tflite": load_tflite}
