"""Published weights by name: `hub:efficientvit_b1.r224_in1k` -> a converted checkpoint on this machine.

    path = resolve_checkpoint("hub:efficientvit_b1")   # a converted Orbax directory (or a plain path as is)
    weights = find_weights("efficientvit_b1")          # where it lives, input size, crop ratio, accuracy

`WEIGHTS` is the one table of every published weight: timm's Hugging Face repositories for the
classification models (`timm/efficientvit_b1.r224_in1k`, file `model.safetensors`, timm layout) and the
official repositories of mit-han-lab/efficientvit (`han-cai/efficientvit-seg`, `han-cai/efficientvit-cls`,
official `.pt` files) for the segmentation models and the two classification weights timm does not host.
A name is `MODEL.TAG` (timm's style); a bare `MODEL` takes the model's first (default) tag.

Files come through `huggingface_hub.hf_hub_download`: its cache (`HF_HUB_CACHE` / `HF_HOME`), offline mode
(`HF_HUB_OFFLINE=1`) and token handling. Before the first conversion the cached file is checked against
the hash the Hub gave it (a cached blob is named by its sha256 for LFS files, by its git sha1 otherwise);
the converted variables are then written once (all or nothing, `save_variables`) beside the download,
`<cache>/models--<org>--<repo>/evit_jax/<model>-<blob hash>/`, and every later call reads them directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

from evit_jax.convert import io
from evit_jax.models import get_model_spec

HUB_PREFIX = "hub:"
CONVERTED_SUBDIR = "evit_jax"  # beside blobs/, refs/ and snapshots/ in the file's repository folder

_TIMM_RESULTS = "timm results-imagenet.csv"
_OFFICIAL_CLS = "mit-han-lab/efficientvit applications/efficientvit_cls/README.md"
_OFFICIAL_SEG = "mit-han-lab/efficientvit applications/efficientvit_seg/README.md"
TOP1 = "ImageNet-1k top-1 %"
MIOU = {"cityscapes": "Cityscapes val mIoU %", "ade20k": "ADE20K val mIoU %"}


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """One published weight file and what it was evaluated with."""

    model: str                      # zoo name (evit_jax.models.list_models())
    tag: str                        # "r224_in1k" ... ("" for the segmentation models: one weight each)
    repo_id: str                    # Hugging Face repository
    filename: str                   # file in that repository
    input_size: tuple[int, int]     # (H, W) it was evaluated at; segmentation: the short side is min()
    crop_ratio: float | None        # classification centre crop (timm's crop_pct); None for segmentation
    metric: str
    score: float                    # the published `metric`
    score_source: str               # where `score` is published
    official_score: float | None = None  # the official README's figure for the same weights, when it differs
    numerics: str = "official"      # create_model(numerics=...) of the code that measured `score`

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}" if self.tag else self.model

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/blob/main/{self.filename}"


def _timm(variant: str, res: int, crop: float, top1: float, official_top1: float | None) -> PretrainedWeights:
    tag = f"r{res}_in1k"
    return PretrainedWeights(f"efficientvit_{variant}", tag, f"timm/efficientvit_{variant}.{tag}", "model.safetensors",
                             (res, res), crop, TOP1, top1, _TIMM_RESULTS, official_top1, numerics="timm")


def _official_cls(variant: str, res: int, top1: float) -> PretrainedWeights:
    return PretrainedWeights(f"efficientvit_{variant}", f"r{res}_in1k", "han-cai/efficientvit-cls",
                             f"efficientvit_{variant}_r{res}.pt", (res, res), 1.0, TOP1, top1, _OFFICIAL_CLS)


def _official_seg(variant: str, dataset: str, miou: float) -> PretrainedWeights:
    size = {"cityscapes": (1024, 2048), "ade20k": (512, 512)}[dataset]
    return PretrainedWeights(f"efficientvit_seg_{variant}_{dataset}", "", "han-cai/efficientvit-seg",
                             f"efficientvit_seg_{variant}_{dataset}.pt", size, None, MIOU[dataset], miou, _OFFICIAL_SEG)


# Every published weight. Classification: timm's default_cfgs (timm/models/efficientvit_mit.py: input size,
# crop_pct) and top-1 from timm's results/results-imagenet.csv, the official README's top-1 beside it;
# L2 r320 and L3 r288 exist only in the official repository (crop ratio 1.0 as its eval script uses).
# Segmentation: the official README's mIoU (Cityscapes at 1024x2048, ADE20K at short side 512).
# The first weight of a model is its default tag.
WEIGHTS: tuple[PretrainedWeights, ...] = (
    _timm("b0", 224, 0.95, 71.408, None),
    _timm("b1", 224, 0.95, 79.254, 79.390),
    _timm("b1", 256, 1.0, 79.734, 79.918),
    _timm("b1", 288, 1.0, 80.322, 80.410),
    _timm("b2", 224, 0.95, 82.162, 82.100),
    _timm("b2", 256, 1.0, 82.712, 82.698),
    _timm("b2", 288, 1.0, 83.078, 83.086),
    _timm("b3", 224, 0.95, 83.444, 83.468),
    _timm("b3", 256, 1.0, 83.782, 83.806),
    _timm("b3", 288, 1.0, 84.162, 84.150),
    _timm("l1", 224, 1.0, 84.464, 84.484),
    _timm("l2", 224, 1.0, 85.046, 85.050),
    _timm("l2", 256, 1.0, 85.380, 85.366),
    _timm("l2", 288, 1.0, 85.614, 85.630),
    _official_cls("l2", 320, 85.734),
    _timm("l2", 384, 1.0, 85.984, 85.978),
    _timm("l3", 224, 1.0, 85.810, 85.814),
    _timm("l3", 256, 1.0, 85.952, 85.938),
    _official_cls("l3", 288, 86.070),
    _timm("l3", 320, 1.0, 86.230, 86.230),
    _timm("l3", 384, 1.0, 86.396, 86.408),
    _official_seg("b0", "cityscapes", 75.653),
    _official_seg("b1", "cityscapes", 80.547),
    _official_seg("b2", "cityscapes", 82.073),
    _official_seg("b3", "cityscapes", 83.016),
    _official_seg("l1", "cityscapes", 82.716),
    _official_seg("l2", "cityscapes", 83.228),
    _official_seg("b1", "ade20k", 42.840),
    _official_seg("b2", "ade20k", 45.941),
    _official_seg("b3", "ade20k", 49.013),
    _official_seg("l1", "ade20k", 49.191),
    _official_seg("l2", "ade20k", 50.702),
)


def list_pretrained() -> list[str]:
    """Every name with published weights (`model.tag`; the segmentation models have no tag)."""
    return [w.name for w in WEIGHTS]


def is_hub_spec(spec: str | os.PathLike) -> bool:
    """True for `hub:NAME` checkpoint specs."""
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX)


def _without_weights(model: str) -> str:
    """Why `model` has no published weights, for the one-line error."""
    spec = get_model_spec(model)
    published = sorted({w.model for w in WEIGHTS})
    if spec.design == "v1":
        why = "is a paper-v1 block design (evit_jax.models.v1); no weights were ever published for it"
    elif spec.task == "backbone":
        classifier = f"efficientvit_{spec.variant}"
        why = "is a bare backbone; no weights are published for backbones alone"
        if classifier in published:
            why += (f" (hub:{classifier} contains it: a segmentation model trained from "
                    f"--config.init_from=hub:{classifier} takes that backbone)")
    elif spec.task == "detection":
        why = "is a detection model; no EfficientViT detection weights are published"
    else:
        why = "has no published weights"
    return f"{model} {why}. Models with weights: {', '.join(published)}"


def find_weights(name: str) -> PretrainedWeights:
    """The published weights a name selects: `efficientvit_b1.r256_in1k`, `efficientvit_b1` (default tag),
    `efficientvit-seg-b1-cityscapes` (official spelling), with or without the `hub:` prefix.

    Raises ValueError (one line) for an unknown model, a model without published weights or an unknown tag.
    """
    text = name[len(HUB_PREFIX):] if is_hub_spec(name) else name
    model_part, _, tag = text.strip().partition(".")
    try:
        model = get_model_spec(model_part).name
    except ValueError as err:  # names close matches
        raise ValueError(f"hub:{text}: {err}") from None
    candidates = [w for w in WEIGHTS if w.model == model]
    if not candidates:
        raise ValueError(f"hub:{text}: {_without_weights(model)}")
    if not tag:
        return candidates[0]
    for weights in candidates:
        if weights.tag == tag.lower():
            return weights
    tags = ", ".join(w.tag for w in candidates if w.tag)
    hint = f"available tags: {tags} (the first is the default)" if tags else "it has one weight: drop the tag"
    raise ValueError(f"hub:{text}: {model} has no weights tagged {tag!r}; {hint}")


# ---------------------------------------------------------------------------- download


def _download(weights: PretrainedWeights) -> Path:
    """The file in the Hugging Face cache (downloaded when missing and the Hub can be reached).

    Raises FileNotFoundError (one line) whenever the file cannot be had: not cached while offline or without
    network, a repository that needs a token, a file gone from the Hub, a failed or incomplete transfer.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub import errors as hf_errors

    from evit_jax import __version__

    where = f"{weights.repo_id}/{weights.filename}"
    try:
        return Path(hf_hub_download(weights.repo_id, weights.filename, library_name="evit_jax",
                                    library_version=__version__))
    except hf_errors.LocalEntryNotFoundError:
        if constants.is_offline_mode():
            reason = "HF_HUB_OFFLINE is set"
        else:
            reason = "the Hugging Face Hub cannot be reached (no network?)"
        raise FileNotFoundError(
            f"hub:{weights.name}: {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"cannot be downloaded: {reason}. Download it once where the Hub can be reached (or copy that "
            f"machine's cache here, or point HF_HUB_CACHE at it), or pass the file's path instead") from None
    except hf_errors.RepositoryNotFoundError as err:  # also gated repositories and 401s
        raise FileNotFoundError(f"hub:{weights.name}: cannot access the repository {weights.repo_id} "
                                f"(HTTP {_status(err)}): log in with `hf auth login` or set HF_TOKEN if it needs a "
                                f"token, or download {weights.url} by hand and pass its path") from None
    except hf_errors.EntryNotFoundError:
        raise FileNotFoundError(f"hub:{weights.name}: {weights.repo_id} has no file {weights.filename} (any "
                                "more); download the weights by hand and pass their path") from None
    except OSError as err:  # HfHubHTTPError, the size consistency check of a broken transfer, a full disk
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FileNotFoundError(f"hub:{weights.name}: downloading {where} failed: {first_line} "
                                "Run the command again to retry") from None


def _status(err: Exception) -> str:
    response = getattr(err, "response", None)
    return str(getattr(response, "status_code", "?"))


def _blob_hash(blob: Path) -> tuple[str, str] | None:
    """(algorithm, expected hex digest) the cache's name for a blob promises: the Hub names an LFS file's
    blob by its sha256 and any other file's by its git blob sha1. None when the name is neither."""
    if re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return "sha256", blob.name
    if re.fullmatch(r"[0-9a-f]{40}", blob.name):
        return "git-sha1", blob.name
    return None


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1()
    if algorithm == "git-sha1":  # git hashes "blob <size>\0" + content
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(weights: PretrainedWeights, file: Path, blob: Path) -> None:
    """Raise (one line) when the cached file's content is not what the Hub's hash says it is."""
    expected = _blob_hash(blob)
    if expected is None:
        return
    algorithm, want = expected
    got = _file_digest(blob, algorithm)
    if got != want:
        raise ValueError(
            f"hub:{weights.name}: the cached {weights.repo_id}/{weights.filename} is damaged or truncated "
            f"({blob.stat().st_size} bytes, {algorithm} {got[:12]}... instead of {want[:12]}...): delete {blob} "
            f"and {file}, then run again to download it anew")


def _revision(weights: PretrainedWeights, file: Path) -> str:
    """The snapshot (commit) folder of `file`: <repo folder>/snapshots/<revision>/<filename>."""
    return file.parents[len(Path(weights.filename).parts) - 1].name


def converted_dir(weights: PretrainedWeights, file: Path) -> Path:
    """Where the converted variables of the cached `file` live: `<repo folder>/evit_jax/<model>-<key>`, the key
    being the blob's hash, or the snapshot revision in a cache without symlinks (each file copied into its
    snapshot), so a new file on the Hub gets a new directory."""
    blob = Path(os.path.realpath(file))
    key = blob.name if blob != file.absolute() else _revision(weights, file)
    repo_folder = file.parents[len(Path(weights.filename).parts) + 1]
    return repo_folder / CONVERTED_SUBDIR / f"{weights.model}-{key}"


def _is_converted(directory: Path, model: str) -> bool:
    try:
        return io.read_metadata(directory).get("model") == model
    except (ValueError, OSError):
        return False


def _convert_into_cache(weights: PretrainedWeights, file: Path, target: Path) -> None:
    blob = Path(os.path.realpath(file))
    _verify(weights, file, blob)
    try:
        variables = io.load_variables(file, weights.model)
    except ValueError as err:  # another model's file, or not a checkpoint at all
        raise ValueError(f"hub:{weights.name}: the cached {weights.repo_id}/{weights.filename} ({blob}) does not "
                         f"hold {weights.model} weights: {err}") from None
    source = {"hub": weights.name, "repo_id": weights.repo_id, "filename": weights.filename,
              "revision": _revision(weights, file), "blob": blob.name, "ema": False}
    try:
        io.save_variables(variables, target, weights.model, source=source)
    except (OSError, ValueError):
        if not _is_converted(target, weights.model):  # not another process finishing first: a real failure
            raise


def resolve_checkpoint(spec: str | os.PathLike) -> str:
    """A local checkpoint path for `spec`: `hub:NAME` -> its converted Orbax directory; anything else is a path,
    returned with `~` expanded (not checked: the reader reports a missing one).

    For `hub:NAME` the file is taken from the Hugging Face cache or downloaded, checked against its Hub hash and
    converted once; later calls return the converted directory without converting. Under several JAX processes
    nothing is written (save_variables writes from one process): the downloaded file itself is returned until a
    single-process call has converted it. Errors (unknown name, no weights, not cached while offline, a damaged
    or wrong file) are one line.
    """
    if not is_hub_spec(spec):
        return os.path.expanduser(os.fspath(spec))
    weights = find_weights(spec)
    file = _download(weights)
    target = converted_dir(weights, file)
    if _is_converted(target, weights.model):
        return str(target)
    import jax

    if jax.process_count() > 1:
        _verify(weights, file, Path(os.path.realpath(file)))
        return str(file)
    _convert_into_cache(weights, file, target)
    return str(target)
