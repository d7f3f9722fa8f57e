"""Export an EfficientViT model to a serving artifact, and check an artifact against the JAX model.

    spec = ExportSpec("efficientvit_b1", "onnx", 224, 224, checkpoint="b1.pt").validate()
    export(spec, "b1.onnx")                     # b1.onnx + b1.onnx.json (the spec)
    report = check("b1.onnx", images=["cat.jpg"])   # reloads it in onnxruntime, compares with JAX

All-or-nothing: the spec is validated and the weights are loaded before anything is written; the
artifact and its description are written into a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from evit_jax.export import formats
from evit_jax.export.spec import ExportError, ExportSpec, default_crop_ratio, metadata_path, read_metadata
from evit_jax.export.serving import input_signature, load_variables, serving_function
from evit_jax.models import get_model_spec

# |artifact - JAX| / max |JAX| allowed by `check`, per compute dtype. float32: the two computations differ
# only in rounding order (BN folding, runtime kernels); half precision: one rounding of a 8/11-bit mantissa
# at every layer, amplified through the depth.
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
CHECK_BATCHES = (1, 5)


def _replace(src: Path, dst: Path) -> None:
    """Move src to dst, replacing an existing dst (file or directory) only once src is complete."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        src.rename(dst)


def export(spec: ExportSpec, out: str | os.PathLike, *, overwrite: bool = False,
           variables: dict | None = None) -> Path:
    """Write the artifact of `spec` at `out` and its description at `out`.json; returns `out`.

    variables: the weights (default: `spec.checkpoint`, or random ones from `spec.seed`).
    """
    spec = spec.validate()
    out = Path(out).absolute()
    for path in (out, metadata_path(out)):
        if path.exists() and not overwrite:
            raise ExportError(f"{path} already exists; pass --overwrite to replace it")
    if out.exists() and out.is_dir() != (spec.format == "savedmodel"):
        raise ExportError(f"{out} is a {'directory' if out.is_dir() else 'file'}; a {spec.format} artifact is "
                          f"{'a directory' if spec.format == 'savedmodel' else 'a file'}")
    variables = load_variables(spec) if variables is None else variables
    fn = serving_function(spec, variables)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        formats.WRITERS[spec.format](fn, spec, tmp / out.name)
        meta = tmp / metadata_path(out).name
        meta.write_text(json.dumps(dict(spec.to_json(), versions=_versions(spec.format)), indent=2) + "\n")
        _replace(tmp / out.name, out)
        _replace(meta, metadata_path(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _versions(fmt: str) -> dict[str, str]:
    import importlib.metadata as md

    names = {"stablehlo": ["jax"], "onnx": ["jax", "jax2onnx", "onnx"], "savedmodel": ["jax", "tensorflow-cpu"],
             "tflite": ["jax", "tensorflow-cpu"]}[fmt]
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


@dataclasses.dataclass
class CheckResult:
    """One comparison of the artifact with the JAX model on one input."""

    input: str  # "random batch 5", an image path...
    max_rel_diff: float  # max |artifact - JAX| / max |JAX| (for label maps: the share of differing pixels)
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_rel_diff <= self.tolerance)


def random_inputs(spec: ExportSpec, batch: int, seed: int = 0) -> np.ndarray:
    """Inputs of the serving signature: uint8 pixels, or normalised-scale float32 values."""
    shape, dtype = input_signature(spec)
    rng = np.random.default_rng(seed)
    shape = (batch,) + shape[1:]
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(np.float32)


def image_inputs(spec: ExportSpec, image: np.ndarray) -> np.ndarray:
    """A decoded uint8 image as one input of the signature (the host-side eval transform when the
    graph does not include it)."""
    from evit_jax.data import seg_transforms, transforms
    from evit_jax.tasks.classification import normalize_images

    if spec.preprocess:
        return transforms.resize(image, (spec.input_height, spec.input_width))[None]
    if spec.task == "classification" and spec.height == spec.width:
        crop = transforms.resize_center_crop(image, spec.height, default_crop_ratio(get_model_spec(spec.model).variant))
    else:
        crop = seg_transforms.resize_image(image, (spec.height, spec.width), "bicubic")
    x = np.asarray(normalize_images(crop[None]))
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if spec.layout == "nchw" else x


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 RGB (H, W, 3) of an image file (ExportError when it cannot be read)."""
    from evit_jax.data.transforms import decode_image

    try:
        return decode_image(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read image {path}: {err}") from None


def compare(artifact: np.ndarray, reference: np.ndarray, labels: bool = False) -> float:
    """max |artifact - reference| / max |reference|; for label maps the share of differing pixels."""
    artifact, reference = np.asarray(artifact), np.asarray(reference)
    if artifact.shape != reference.shape:
        raise ExportError(f"the artifact returned shape {artifact.shape}, the JAX model {reference.shape}")
    if labels:
        return float(np.mean(artifact.astype(np.int64) != reference.astype(np.int64)))
    reference = reference.astype(np.float64)
    return float(np.abs(artifact.astype(np.float64) - reference).max() / max(np.abs(reference).max(), 1e-30))


def check(path: str | os.PathLike, images: Sequence[str | os.PathLike] = (), *, batches: Sequence[int] = CHECK_BATCHES,
          tolerance: float | None = None, label_tolerance: float = 1e-3) -> list[CheckResult]:
    """Reload the artifact at `path` in its runtime and compare it with the JAX model (unfolded, default
    convolutions, same weights) on random inputs of each batch size (only its own batch when it is fixed)
    and on `images`.

    Label maps (segmentation with --preprocess) may differ where two classes' resized logits tie within
    rounding: up to `label_tolerance` of the pixels.
    """
    path = Path(path)
    spec = read_metadata(path)
    pictures = [(str(p), read_image(p)) for p in images]
    runner = formats.LOADERS[spec.format](path, spec)
    reference = jax.jit(serving_function(spec, load_variables(spec), export=False))
    labels = spec.output_name == "labels"
    tol = label_tolerance if labels else (TOLERANCES[spec.dtype] if tolerance is None else tolerance)
    inputs: list[tuple[str, np.ndarray]] = []
    for b in ([spec.batch] if spec.batch else batches):
        inputs.append((f"random batch {b}", random_inputs(spec, b, seed=b)))
    inputs += [(name, image_inputs(spec, picture)) for name, picture in pictures]
    return [CheckResult(name, compare(runner(x), np.asarray(reference(x)), labels), tol) for name, x in inputs]
