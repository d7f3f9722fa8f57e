"""What an export is: the model, its weights, the serving signature and the format, checked up front.

An `ExportSpec` is validated before any work (unknown format, model or dtype, a resolution the model
cannot take, options that do not go together) and is written beside every artifact as
`<artifact>.json` (`metadata_path`), so that `python -m evit_jax.export --check PATH` can rebuild the same
JAX computation from the same weights and compare.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from evit_jax.models import get_model_spec

FORMATS = ("stablehlo", "onnx", "savedmodel", "tflite")
DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("nhwc", "nchw")
# Model tasks that export, and the name of their output. Detection models export their raw head output
# (B, N, 4 + 1 + C); box decoding and NMS are a separate post-processing step.
OUTPUT_NAMES = {"classification": "logits", "segmentation": "logits", "detection": "raw"}
# Formats x compute dtypes that convert and run (others are refused up front).
FORMAT_DTYPES = {"stablehlo": DTYPES, "onnx": ("float32", "float16"), "savedmodel": DTYPES, "tflite": ("float32",)}
DEFAULT_OPSET = 18
METADATA_FORMAT = "evit_jax.export"
METADATA_VERSION = 1
# Official evaluation crop ratios (mit-han-lab/efficientvit applications/efficientvit_cls and timm's
# pretrained configs: 0.95 for B0/B1 at 224 px, 1.0 for B2/B3 and the L models); configs/imagenet.py
# uses the same values.
EVAL_CROP_RATIOS = {"b0": 0.95, "b1": 0.95}
STRIDE = 32


class ExportError(ValueError):
    """A user error: reported as one line by the command, raised before anything is written."""


def parse_size(text: str | int | tuple[int, int], flag: str = "--res") -> tuple[int, int]:
    """`224` -> (224, 224); `512x1024` -> (512, 1024) (height x width)."""
    if isinstance(text, tuple):
        return int(text[0]), int(text[1])
    parts = str(text).lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ExportError(f"{flag} must be N or HxW (e.g. 224 or 512x1024), got {text!r}") from None
    sizes = sizes * 2 if len(sizes) == 1 else sizes
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ExportError(f"{flag} must be N or HxW (e.g. 224 or 512x1024), got {text!r}")
    return sizes[0], sizes[1]


def default_crop_ratio(variant: str) -> float:
    return EVAL_CROP_RATIOS.get(variant, 1.0)


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """One serving artifact.

    height/width: the model input. batch: a fixed batch, or None for a dynamic (symbolic) batch.
    dtype: compute dtype of the model (parameters are stored in it too); inputs and outputs stay float32,
      LiteMLA's products and division stay float32 in every dtype.
    layout: "nhwc" or "nchw" (float input and spatial outputs transposed, PyTorch style).
    preprocess: uint8 NHWC images of `input_height` x `input_width` in, the eval transform in the graph.
    checkpoint: the weights (None: random weights from `seed`, for trying the pipeline).
    numerics: "official" or "timm" (evit_jax.models.create_model): a timm checkpoint computes timm's
      function (LiteMLA eps 1e-5, no quadratic path) only with "timm".
    """

    model: str
    format: str
    height: int = 224
    width: int = 224
    batch: int | None = None
    dtype: str = "float32"
    layout: str = "nhwc"
    preprocess: bool = False
    input_height: int | None = None
    input_width: int | None = None
    crop_ratio: float | None = None
    checkpoint: str | None = None
    use_ema: bool = False
    num_classes: int | None = None
    numerics: str = "official"
    seed: int = 0
    opset: int = DEFAULT_OPSET
    platforms: tuple[str, ...] = ("cpu", "cuda", "tpu")

    @property
    def task(self) -> str:
        return get_model_spec(self.model).task

    @property
    def output_name(self) -> str:
        return "labels" if self.preprocess and self.task == "segmentation" else OUTPUT_NAMES[self.task]

    def validate(self) -> "ExportSpec":
        """The spec with defaults filled in; ExportError for anything that cannot be exported."""
        try:
            model_spec = get_model_spec(self.model)
        except ValueError as err:
            raise ExportError(str(err)) from None
        if self.format not in FORMATS:
            raise ExportError(f"unknown format {self.format!r}; use one of {', '.join(FORMATS)}")
        if model_spec.task not in OUTPUT_NAMES:
            raise ExportError(f"{model_spec.name} is a {model_spec.task} model; export a classification, "
                              "segmentation or detection model (a backbone's feature dict has no serving signature)")
        if self.dtype not in FORMAT_DTYPES[self.format]:
            raise ExportError(f"--dtype {self.dtype} is not supported for {self.format}; use one of "
                              f"{', '.join(FORMAT_DTYPES[self.format])}")
        if self.numerics not in ("official", "timm"):
            raise ExportError(f"--numerics must be official or timm, got {self.numerics!r}")
        if self.layout not in LAYOUTS:
            raise ExportError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.height % STRIDE or self.width % STRIDE or min(self.height, self.width) < STRIDE:
            raise ExportError(f"--res {self.height}x{self.width}: EfficientViT needs a height and width that are "
                              f"positive multiples of {STRIDE} (e.g. 224 or 512x1024)")
        if self.batch is not None and self.batch < 1:
            raise ExportError(f"--batch must be >= 1, got {self.batch}")
        if self.checkpoint is not None and not Path(self.checkpoint).exists():
            raise ExportError(f"--checkpoint {self.checkpoint} does not exist")
        updates: dict[str, Any] = {"model": model_spec.name}
        if self.checkpoint is not None:
            updates["checkpoint"] = os.path.abspath(self.checkpoint)
        if self.preprocess:
            if model_spec.task == "detection":
                raise ExportError("--preprocess is not available for detection models: export the raw head "
                                  "output and run the detection pre/post-processing outside the graph")
            if self.layout != "nhwc":
                raise ExportError("--preprocess takes uint8 NHWC images as decoded; drop --layout nchw")
            updates["input_height"] = self.input_height or self.height
            updates["input_width"] = self.input_width or self.width
            if model_spec.task == "classification":
                ratio = self.crop_ratio if self.crop_ratio is not None else default_crop_ratio(model_spec.variant)
                if not 0 < ratio <= 1:
                    raise ExportError(f"--crop-ratio must be in (0, 1], got {ratio}")
                updates["crop_ratio"] = ratio
        elif self.input_height or self.input_width or self.crop_ratio is not None:
            raise ExportError("--input-size and --crop-ratio describe the baked-in preprocessing; add --preprocess")
        return dataclasses.replace(self, **updates)

    def to_json(self) -> dict[str, Any]:
        return {"format_name": METADATA_FORMAT, "version": METADATA_VERSION, **dataclasses.asdict(self),
                "task": self.task, "output_name": self.output_name}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ExportSpec":
        if data.get("format_name") != METADATA_FORMAT:
            raise ExportError(f"not an evit_jax export description (format_name {data.get('format_name')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["platforms"] = tuple(values.get("platforms", ()))
        return cls(**values)


def metadata_path(artifact: str | os.PathLike) -> Path:
    """Where the description of `artifact` lives: `<artifact>.json` beside it (a file or a directory)."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def read_metadata(artifact: str | os.PathLike) -> ExportSpec:
    """The ExportSpec written beside `artifact` (ExportError when there is none)."""
    path = metadata_path(artifact)
    if not Path(artifact).exists():
        raise ExportError(f"{artifact} does not exist")
    if not path.is_file():
        raise ExportError(f"{artifact} has no export description {path.name} beside it; check artifacts written by "
                          "python -m evit_jax.export")
    return ExportSpec.from_json(json.loads(path.read_text()))
