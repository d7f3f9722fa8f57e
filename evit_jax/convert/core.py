"""PyTorch state dicts <-> Flax variables for every model of the zoo, strictly checked.

The table of expected keys is built mechanically: the model's abstract variables (`jax.eval_shape` of
`init`, no computation) give every Flax path, shape and dtype, and `mapping.py` renames each path to its
PyTorch key (official layout, or timm's for the seven classification models). Conversion is all or
nothing: any missing, unexpected or mis-shaped key raises one ValueError that lists them all and, when the
checkpoint fits another model of the zoo better, names that model.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from evit_jax.convert import mapping
from evit_jax.convert.tensors import is_array, to_numpy
from evit_jax.models import create_model, get_model_spec, list_models

LAYOUTS = ("official", "timm")
# Where EMA weights live: the official trainer saves {"ema": {decay: state_dict}}, timm {"state_dict_ema": ...}.
EMA_KEYS = ("ema", "state_dict_ema", "model_ema")
STATE_DICT_KEYS = ("state_dict", "model")
# Wrappers whose prefix is stripped when every key carries it: DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_GROUPS_SHOWN = 12
_LEAF_ORDER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One variable: its PyTorch key and shape, and where it lives in the Flax tree."""

    torch_key: str
    flax_path: tuple[str, ...]  # (collection, *module path, leaf)
    flax_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    is_float: bool


# ----------------------------------------------------------------------------------------- key tables


def _resolve(model_name: str, num_classes: int | None) -> tuple[str, int | None]:
    spec = get_model_spec(model_name)
    if num_classes is not None and spec.task == "backbone":
        raise ValueError(f"{spec.name} is a backbone and has no classes; drop num_classes")
    if num_classes == spec.num_classes:
        num_classes = None
    return spec.name, num_classes


@functools.lru_cache(maxsize=None)
def _abstract_variables(name: str, num_classes: int | None) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    # Shapes do not depend on the conv implementation; lax.conv is the cheapest to trace.
    model = create_model(name, num_classes=num_classes, conv_impl="lax")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return traverse_util.flatten_dict(dict(shapes))


def abstract_variables(model_name: str, num_classes: int | None = None) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat {(collection, *path): ShapeDtypeStruct} of a model's variables, computed without running it."""
    return dict(_abstract_variables(*_resolve(model_name, num_classes)))


def has_timm_layout(model_name: str) -> bool:
    """timm ports only the seven released classification models (efficientvit_b0..b3, l1..l3)."""
    spec = get_model_spec(model_name)
    return spec.task == "classification" and getattr(spec, "design", "v2") == "v2"


def timm_models() -> list[str]:
    return [n for n in list_models("classification") if has_timm_layout(n)]


def _layouts_of(name: str) -> tuple[str, ...]:
    return LAYOUTS if has_timm_layout(name) else ("official",)


def _check_layout(name: str, layout: str, allow_auto: bool) -> None:
    allowed = (("auto",) if allow_auto else ()) + LAYOUTS
    if layout not in allowed:
        raise ValueError(f"layout must be one of {', '.join(allowed)}, got {layout!r}")
    if layout == "timm" and not has_timm_layout(name):
        raise ValueError(f"{name} has no timm layout (timm ports only the classification models "
                         f"{', '.join(timm_models())}); use layout='official'")


@functools.lru_cache(maxsize=None)
def _key_table(name: str, num_classes: int | None, layout: str) -> tuple[Entry, ...]:
    family = get_model_spec(name).family
    entries = []
    for flax_path, sds in _abstract_variables(name, num_classes).items():
        collection, path = flax_path[0], flax_path[1:]
        key = mapping.flax_to_torch_key(collection, path)
        if layout == "timm":
            key = mapping.timm_key(key, family)
        entries.append(Entry(key, flax_path, tuple(sds.shape), mapping.flax_to_torch_shape(collection, path, sds.shape),
                             bool(jnp.issubdtype(sds.dtype, jnp.floating))))
    return tuple(sorted(entries, key=lambda e: _natural_key(e.torch_key)))


def key_table(model_name: str, layout: str = "official", num_classes: int | None = None) -> tuple[Entry, ...]:
    """Every variable of `model_name` with its PyTorch key in `layout`, in natural key order."""
    name, num_classes = _resolve(model_name, num_classes)
    _check_layout(name, layout, allow_auto=False)
    return _key_table(name, num_classes, layout)


def _natural_key(key: str) -> tuple:
    *modules, leaf = key.split(".")
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in modules) + ((2, _LEAF_ORDER.get(leaf, 9), leaf),)


# --------------------------------------------------------------------------------- checkpoint unwrapping


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) and is_array(v) for k, v in obj.items())


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:8]]
        return f"a dict with keys {', '.join(keys)}{', ...' if len(obj) > 8 else ''}"
    return f"a {type(obj).__name__}"


def _unwrap_ema(ema: Any) -> Mapping:
    """The EMA state dict inside `ema`: a state dict, {"state_dict"/"module": sd} or the official {decay: sd}."""
    if _is_state_dict(ema):
        return ema
    if isinstance(ema, Mapping):
        for key in STATE_DICT_KEYS + ("module", "shadows"):
            if isinstance(ema.get(key), Mapping):
                return _unwrap_ema(ema[key])
        if len(ema) == 1:
            return _unwrap_ema(next(iter(ema.values())))
    raise ValueError(f"cannot find a state dict in the checkpoint's EMA entry ({_describe(ema)})")


def extract_state_dict(checkpoint: Any, use_ema: bool = False) -> dict[str, np.ndarray]:
    """The flat state dict of a checkpoint, as numpy arrays (dtypes and bits kept).

    Accepts a bare state dict, `{"state_dict": ..., "ema": ...}` (official trainer; `ema` may be a state
    dict or a dict holding one, such as the official `{decay: state_dict}`), timm's `state_dict_ema`, and
    strips a DDP `module.` (or torch.compile `_orig_mod.`) prefix. use_ema picks the EMA weights and fails
    when there are none.
    """
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"a checkpoint must be a non-empty dict (a state dict or {{'state_dict': ...}}), got {_describe(checkpoint)}")
    if use_ema:
        found = [k for k in EMA_KEYS if checkpoint.get(k) is not None] if not _is_state_dict(checkpoint) else []
        if not found:
            raise ValueError(f"EMA weights were asked for (use_ema / --use-ema) but the checkpoint has none: it is "
                             f"{_describe(checkpoint)}; EMA weights are looked for under {', '.join(map(repr, EMA_KEYS))}. "
                             "Drop --use-ema to convert the plain weights")
        state_dict = _unwrap_ema(checkpoint[found[0]])
    elif _is_state_dict(checkpoint):
        state_dict = checkpoint
    else:
        inner = [k for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), Mapping)]
        if not inner or not _is_state_dict(checkpoint[inner[0]]):
            raise ValueError(f"cannot find a state dict in the checkpoint: it is {_describe(checkpoint)}; expected a "
                             "state dict (name -> tensor) or {'state_dict': state_dict, ...}")
        state_dict = checkpoint[inner[0]]
    state_dict = {k: to_numpy(v) for k, v in state_dict.items()}
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _strip_backbone_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Keys of a backbone as the backbone module names them: `backbone.` dropped when most keys carry it
    (a whole-model checkpoint keeps its other keys, which then show up as unexpected)."""
    prefixed = sum(k.startswith("backbone.") for k in state_dict)
    if state_dict and prefixed * 2 >= len(state_dict):
        return {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state_dict.items()}
    return state_dict


# ------------------------------------------------------------------------------------ strict checking


@dataclasses.dataclass
class Mismatch:
    """What keeps a set of named arrays from fitting a model."""

    missing: list[str]
    unexpected: list[str]
    wrong: list[str]  # "key (checkpoint <shape/dtype>, model <shape/dtype>)"
    wrong_keys: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)

    def summary(self) -> str:
        return f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.wrong)} of the wrong shape or dtype"


def _kind(is_float: bool) -> str:
    return "floating" if is_float else "integer"


def compare(arrays: Mapping[str, Any], expected: Mapping[str, tuple[tuple[int, ...], bool]]) -> Mismatch:
    """Compare {name: array} with {name: (shape, is_float)}."""
    missing = [k for k in expected if k not in arrays]
    unexpected = [k for k in arrays if k not in expected]
    wrong, wrong_keys = [], []
    for key, (shape, is_float) in expected.items():
        if key not in arrays:
            continue
        value = arrays[key]
        got_shape = tuple(value.shape)
        got_float = bool(jnp.issubdtype(value.dtype, jnp.floating))
        if got_shape != shape:
            wrong.append(f"{key} (checkpoint {got_shape}, model {shape})")
            wrong_keys.append(key)
        elif got_float != is_float:
            wrong.append(f"{key} (checkpoint {value.dtype}, model needs a {_kind(is_float)} dtype)")
            wrong_keys.append(key)
    return Mismatch(missing, unexpected, wrong, wrong_keys)


def group_keys(keys: list[str], sep: str = ".", limit: int = _MAX_GROUPS_SHOWN) -> str:
    """`a.b.weight, a.b.bias, c.weight` -> `a.b.{weight,bias}, c.weight`, at most `limit` groups shown."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parent, _, leaf = key.rpartition(sep)
        groups.setdefault(parent, []).append(leaf)
    parts = []
    for parent, leaves in groups.items():
        tail = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        parts.append(f"{parent}{sep}{tail}" if parent else tail)
    shown = parts[:limit]
    rest = sum(len(leaves) for leaves in list(groups.values())[limit:])
    return ", ".join(shown) + (f", ... and {rest} more" if rest else "")


def _list_problems(m: Mismatch, sep: str) -> str:
    parts = []
    if m.missing:
        parts.append(f"missing ({len(m.missing)}): {group_keys(m.missing, sep)}")
    if m.unexpected:
        parts.append(f"unexpected ({len(m.unexpected)}): {group_keys(m.unexpected, sep)}")
    if m.wrong:
        shown = m.wrong[:_MAX_GROUPS_SHOWN]
        more = len(m.wrong) - len(shown)
        parts.append(f"wrong shape/dtype ({len(m.wrong)}): {', '.join(shown)}{f', ... and {more} more' if more else ''}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ which model is this?


def _guess_task_family(keys: list[str]) -> tuple[str | None, str | None]:
    if any(re.match(r"(backbone\.)?head\.(input_ops|middle|output_ops)\.", k) for k in keys):
        task = "segmentation"
    elif any(k.startswith("head.") for k in keys):
        task = "classification"
    else:
        task = "backbone"
    if any("input_stem." in k or re.match(r"stem\.res\d+\.main\.depth_conv\.", k) for k in keys):
        family = "b"
    elif any(k.startswith(("stem.", "stages.", "backbone.stages.")) for k in keys):
        family = "l"
    else:
        family = None
    return task, family


def _agreement(state_dict: Mapping[str, Any], table: tuple[Entry, ...]) -> float:
    """Share of keys that exist on both sides with the same shape, over the larger of the two key sets."""
    matched = sum(1 for e in table if e.torch_key in state_dict and tuple(state_dict[e.torch_key].shape) == e.torch_shape)
    return matched / max(len(state_dict), len(table))


def score_models(state_dict: Mapping[str, Any], candidates: list[str] | None = None, *,
                 stop_at_exact: bool = False) -> list[tuple[float, str, str]]:
    """(agreement, model, layout) for candidate models and layouts, best first.

    By default the candidates are the zoo's models of the task and family the keys suggest (all models
    when the keys suggest nothing), which keeps this cheap: each candidate costs one abstract `init`.
    stop_at_exact: stop at the first candidate that agrees on every key (nothing can beat it).
    """
    if candidates is None:
        task, family = _guess_task_family(list(state_dict))
        candidates = [n for n in list_models() if get_model_spec(n).task == task
                      and (family is None or get_model_spec(n).family == family)] or list_models()
    scores = []
    for name in candidates:
        spec = get_model_spec(name)
        sd = _strip_backbone_prefix(state_dict) if spec.task == "backbone" else state_dict
        for layout in _layouts_of(spec.name):
            scores.append((_agreement(sd, _key_table(spec.name, None, layout)), spec.name, layout))
            if stop_at_exact and scores[-1][0] == 1.0:
                return sorted(scores, key=lambda s: -s[0])
    return sorted(scores, key=lambda s: -s[0])


def _likely_model_hint(state_dict: Mapping[str, Any], name: str, num_classes: int | None, layout: str) -> str:
    own = _strip_backbone_prefix(state_dict) if get_model_spec(name).task == "backbone" else state_dict
    requested = _agreement(own, _key_table(name, num_classes, layout))
    # Same variant first (a wrong dataset or task is the common slip), so an exact match ends the search early.
    task, family = _guess_task_family(list(state_dict))
    if family is None:  # no stem/stage keys at all: nothing in the zoo can match, skip the search
        return " None of its keys look like an EfficientViT checkpoint (no stem or stage keys)."
    own = get_model_spec(name)

    def order(n: str) -> tuple:
        spec = get_model_spec(n)
        return spec.variant != own.variant, getattr(spec, "design", "") != getattr(own, "design", ""), n

    candidates = sorted((n for n in list_models() if get_model_spec(n).task == task
                         and (family is None or get_model_spec(n).family == family)), key=order) or list_models()
    scores = score_models(state_dict, candidates, stop_at_exact=True)
    if not scores:
        return ""
    best, best_name, best_layout = scores[0]
    if best <= requested or (best_name, best_layout) == (name, layout):
        return ""
    if best < 0.5:
        return f" The checkpoint fits no model of the zoo well (best: {best_name}, {best:.0%} of keys and shapes agree)."
    if best_name == name:
        return f" It is a {best_layout}-layout checkpoint ({best:.0%} of keys and shapes agree): pass layout={best_layout!r}."
    return (f" It most likely belongs to {best_name} ({best_layout} layout, {best:.0%} of keys and shapes agree "
            f"vs {requested:.0%} for {name}): pass that model name.")


def _num_classes_hint(state_dict: Mapping[str, Any], name: str, layout: str, problems: Mismatch) -> str:
    """When only the classifier's size differs (a fine-tuned checkpoint), say which num_classes fits."""
    if get_model_spec(name).task == "backbone" or problems.missing or problems.unexpected:
        return ""
    shape = tuple(state_dict[problems.wrong_keys[0]].shape)
    if not shape:
        return ""
    table = _key_table(name, shape[0], layout)
    if compare(state_dict, {e.torch_key: (e.torch_shape, e.is_float) for e in table}):
        return ""
    return f" Its classifier has {shape[0]} classes: pass num_classes={shape[0]} (--num-classes {shape[0]})."


# ------------------------------------------------------------------------------------- conversions


def detect_layout(state_dict: Mapping[str, Any], model_name: str) -> str:
    """"official" or "timm": the layout whose keys the state dict shares most (official on a tie)."""
    name = get_model_spec(model_name).name
    if not has_timm_layout(name):
        return "official"
    keys = set(state_dict)
    overlap = {layout: len(keys & {e.torch_key for e in _key_table(name, None, layout)}) for layout in LAYOUTS}
    return "timm" if overlap["timm"] > overlap["official"] else "official"


def torch_to_flax(state_dict: Any, model_name: str, layout: str = "auto", *, use_ema: bool = False,
                  num_classes: int | None = None) -> dict[str, dict]:
    """A PyTorch checkpoint -> Flax variables `{"params": ..., "batch_stats": ...}` of numpy arrays.

    state_dict: a state dict (torch tensors or numpy arrays) or a whole official/timm checkpoint dict
      (see `extract_state_dict`; use_ema picks its EMA weights). Dtypes are preserved bit for bit.
    layout: "official", "timm" (classification models only) or "auto" (detected from the keys).
    Raises ValueError listing every missing, unexpected or mis-shaped key, naming the model the checkpoint
    most likely belongs to when it is not `model_name`.
    """
    name, num_classes = _resolve(model_name, num_classes)
    _check_layout(name, layout, allow_auto=True)
    original = sd = extract_state_dict(state_dict, use_ema)
    if get_model_spec(name).task == "backbone":
        sd = _strip_backbone_prefix(sd)
    if layout == "auto":
        layout = detect_layout(sd, name)
    table = _key_table(name, num_classes, layout)
    problems = compare(sd, {e.torch_key: (e.torch_shape, e.is_float) for e in table})
    if problems:
        hint = _num_classes_hint(sd, name, layout, problems) or _likely_model_hint(original, name, num_classes, layout)
        raise ValueError(f"checkpoint does not fit {name} ({layout} layout): {problems.summary()}.{hint} "
                         f"{_list_problems(problems, '.')}")
    flat = {}
    for e in table:
        collection, path = e.flax_path[0], e.flax_path[1:]
        flat[e.flax_path] = mapping.torch_to_flax_array(collection, path, sd[e.torch_key])
    return traverse_util.unflatten_dict(flat)


def flatten_variables(variables: Mapping) -> dict[tuple[str, ...], Any]:
    """Flat {(collection, *path): array} of a (possibly frozen) variables tree."""
    if hasattr(variables, "unfreeze"):
        variables = variables.unfreeze()
    return traverse_util.flatten_dict(dict(variables))


def check_variables(variables: Mapping, model_name: str, num_classes: int | None = None) -> None:
    """Raise one ValueError listing every Flax variable that is missing, unexpected or mis-shaped."""
    name, num_classes = _resolve(model_name, num_classes)
    flat = {"/".join(k): v for k, v in flatten_variables(variables).items()}
    expected = {"/".join(e.flax_path): (e.flax_shape, e.is_float) for e in _key_table(name, num_classes, "official")}
    problems = compare(flat, expected)
    if problems:
        raise ValueError(f"variables do not fit {name}: {problems.summary()}. {_list_problems(problems, '/')}")


def flax_to_torch(variables: Mapping, model_name: str, layout: str = "official", *,
                  num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Flax variables -> PyTorch state dict {key: numpy array} in the official or timm layout.

    Kernels are transposed to PyTorch's layout; every dtype is kept except the BN counter, which PyTorch
    keeps as int64. Backbone models give keys without the `backbone.` prefix (the official backbone
    module's own state dict). Raises ValueError listing every offending variable.
    """
    name, num_classes = _resolve(model_name, num_classes)
    _check_layout(name, layout, allow_auto=False)
    check_variables(variables, name, num_classes)
    flat = flatten_variables(variables)
    out = {}
    for e in _key_table(name, num_classes, layout):
        collection, path = e.flax_path[0], e.flax_path[1:]
        out[e.torch_key] = mapping.flax_to_torch_array(collection, path, np.asarray(flat[e.flax_path]))
    return out
