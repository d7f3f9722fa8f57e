"""Serving artifacts of EfficientViT models (StableHLO, ONNX, TF SavedModel, TFLite), checked against JAX.

    python -m evit_jax.export --model efficientvit_b1 --checkpoint b1.pt --format onnx --out b1.onnx
    python -m evit_jax.export --check b1.onnx [cat.jpg ...]

Python: `ExportSpec(...)`, `export(spec, out)`, `check(path, images)`; see docs/export.md. The converters
(jax2onnx, onnxruntime, TensorFlow) are imported only when their format is used.
"""

from evit_jax.export.api import CheckResult, check, export
from evit_jax.export.spec import FORMATS, ExportError, ExportSpec, read_metadata

__all__ = ["FORMATS", "CheckResult", "ExportError", "ExportSpec", "check", "export", "read_metadata"]
