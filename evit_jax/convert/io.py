"""Checkpoint files: PyTorch .pt/.pth, .safetensors, and Orbax directories of converted variables.

Every reader is safe (`torch.load(..., weights_only=True)`, never arbitrary pickles) and every writer is
all-or-nothing: the output is written beside the destination under a temporary name and renamed into
place only once complete, after all checks have passed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from evit_jax.convert import core
from evit_jax.convert.tensors import _torch, to_torch
from evit_jax.models import create_model, get_model_spec

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
METADATA_FILE = "evit_jax.json"
VARIABLES_SUBDIR = "variables"
FORMAT_NAME = "evit_jax.variables"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------ PyTorch files


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,):
        raise ValueError(f"{path}: unsupported checkpoint file type {suffix or '(none)'!r}; use "
                         f"{', '.join(TORCH_SUFFIXES)} (PyTorch) or {SAFETENSORS_SUFFIX}")
    return suffix


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The object stored in a PyTorch (.pt/.pth/.bin) or .safetensors file.

    PyTorch files are read with `torch.load(path, map_location="cpu", weights_only=True)` (tensors, dicts
    and plain values only); .safetensors files with `safetensors.numpy`, without torch.
    """
    path = Path(path)
    suffix = _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import load_file

        return load_file(str(path))
    torch = _torch()
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds; all mean "cannot read this file safely"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: cannot read it with torch.load(weights_only=True): {first_line}") from err


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename over `path`; nothing is left behind when write fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_torch_checkpoint(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, layout: str = "official",
                           *, overwrite: bool = False) -> Path:
    """Write a state dict of numpy arrays: .pt/.pth/.bin via torch.save, .safetensors via safetensors.

    PyTorch files of the official layout hold `{"state_dict": ...}` (what the official zoo loads); the timm
    layout is a bare state dict (what timm loads). .safetensors files always hold the bare state dict.
    """
    path = Path(path)
    suffix = _check_suffix(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file")
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import save_file

        arrays = {k: np.ascontiguousarray(v) if np.ndim(v) else np.asarray(v) for k, v in state_dict.items()}
        _atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={"format": "pt"}))
    else:
        torch = _torch()
        tensors = {k: to_torch(v) for k, v in state_dict.items()}
        obj = {"state_dict": tensors} if layout == "official" else tensors
        _atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path


# ------------------------------------------------------------------------------- Orbax directories


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def save_variables(variables: Mapping, directory: str | os.PathLike, model_name: str, *, overwrite: bool = False,
                   num_classes: int | None = None, source: Mapping[str, Any] | None = None) -> Path:
    """Write converted variables as an Orbax checkpoint in `directory`, with the model name beside them.

    The directory gets `variables/` (Orbax PyTree checkpoint, dtypes kept) and `evit_jax.json` (model name,
    num_classes, layout and `source`: where the weights came from, e.g. {"path": ..., "ema": true}).
    The variables are checked against the model first; an existing non-empty directory is refused unless
    overwrite=True; the checkpoint is written to a temporary sibling and renamed into place.
    """
    import orbax.checkpoint as ocp

    name = get_model_spec(model_name).name
    core.check_variables(variables, name, num_classes)
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    if _is_nonempty_dir(directory) and not overwrite:
        raise ValueError(f"{directory} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if jax.process_count() > 1:
        raise ValueError("save_variables writes from one process; run the conversion in a single process")

    tree = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in core.flatten_variables(variables).items()})
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": name,
                "num_classes": num_classes if num_classes is not None else get_model_spec(name).num_classes,
                "layout": "flax", "collections": sorted(tree), "source": dict(source or {})}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        ocp.PyTreeCheckpointer().save(tmp / VARIABLES_SUBDIR, tree)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The `evit_jax.json` of a directory written by save_variables (ValueError if there is none)."""
    directory = Path(directory)
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise ValueError(f"{directory} is a directory but not one written by evit_jax save_variables "
                         f"(no {METADATA_FILE}); give a .pt/.pth/.safetensors file or a converted directory")
    metadata = json.loads(meta_path.read_text())
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{meta_path} is not an evit_jax variables description (format {metadata.get('format')!r})")
    return metadata


def stored_num_classes(path: str | os.PathLike, model_name: str) -> int | None:
    """The non-default classifier size recorded by save_variables in `path` (None for files and defaults)."""
    if not Path(path).is_dir():
        return None
    stored = read_metadata(path).get("num_classes")
    return stored if stored != get_model_spec(model_name).num_classes else None


def _load_orbax(directory: Path, name: str, use_ema: bool, num_classes: int | None) -> dict:
    import orbax.checkpoint as ocp

    metadata = read_metadata(directory)
    if metadata["model"] != name:
        raise ValueError(f"{directory} holds variables converted for {metadata['model']}, not {name}; "
                         f"pass model {metadata['model']!r} or convert the right checkpoint")
    if use_ema and not metadata.get("source", {}).get("ema", False):
        raise ValueError(f"{directory} was not converted from EMA weights; convert the original checkpoint with "
                         "--use-ema, or drop use_ema")
    if num_classes is None:
        num_classes = stored_num_classes(directory, name)
    variables = ocp.PyTreeCheckpointer().restore(directory / VARIABLES_SUBDIR)
    variables = jax.tree.map(np.asarray, variables)
    core.check_variables(variables, name, num_classes)
    return variables


def load_variables(path: str | os.PathLike, model_name: str, use_ema: bool = False, *, layout: str = "auto",
                   num_classes: int | None = None) -> dict:
    """Flax variables of `model_name` from any supported source.

    path: an official `.pt`/`.pth` (possibly `{"state_dict", "ema", ...}`), a timm `.pth`/`.safetensors`, a
    bare state dict file, or a directory written by `save_variables` (whose stored model name must match).
    use_ema: take the EMA weights of a training checkpoint (error if it has none).
    Raises ValueError listing every offending key when the checkpoint does not fit the model.
    """
    name = get_model_spec(model_name).name
    path = Path(path)
    if path.is_dir():
        return _load_orbax(path, name, use_ema, num_classes)
    if not path.exists() and not path.suffix:
        raise FileNotFoundError(f"{path} does not exist (expected a checkpoint file or a converted directory)")
    checkpoint = read_checkpoint(path)
    try:
        return core.torch_to_flax(checkpoint, name, layout, use_ema=use_ema, num_classes=num_classes)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_pretrained(name: str, checkpoint_path: str | os.PathLike | None = None, *, use_ema: bool = False,
                    num_classes: int | None = None, **model_kwargs) -> tuple[Any, dict]:
    """(model, variables) for `name` from its published weights, a PyTorch checkpoint file or an Orbax directory.

    Without `checkpoint_path` the published weights of `name` are used (`efficientvit_b1.r256_in1k`, or a bare
    `efficientvit_b1` for the default tag; see `evit_jax.convert.hub`): downloaded through huggingface_hub and
    converted on the first call, read from the converted cache afterwards. `checkpoint_path` may also be a
    `hub:NAME` spec. The model is `create_model(name, num_classes=..., **model_kwargs)`; its numerics default to
    those the published weights were evaluated with (timm's for timm's files), official numerics otherwise.
    The variables keep the checkpoint's dtypes.
    """
    from evit_jax.convert import hub  # hub builds on this module

    spec = checkpoint_path if checkpoint_path is not None else hub.HUB_PREFIX + name
    if hub.is_hub_spec(spec):
        weights = hub.find_weights(spec)
        if get_model_spec(weights.model).name != get_model_spec(name).name:
            raise ValueError(f"{spec} holds weights of {weights.model}, not {get_model_spec(name).name}")
        model_kwargs.setdefault("numerics", weights.numerics)
    path = hub.resolve_checkpoint(spec)
    variables = load_variables(path, name, use_ema, num_classes=num_classes)
    if num_classes is None:
        num_classes = stored_num_classes(path, name)
    return create_model(name, num_classes=num_classes, **model_kwargs), variables
