"""Published weights by name (evit_jax.convert.hub) and the ImageNet class names.

Every test runs offline (HF_HUB_OFFLINE=1, tests/conftest.py) against a Hugging Face cache built here in
huggingface_hub's own layout (`models--org--repo/{blobs/<sha256>, refs/main, snapshots/<rev>/<file>}` with
the snapshot file a relative symlink to its blob), holding random weights written as the hubs serve them:
timm's `model.safetensors` (a timm state dict saved by safetensors.torch) and the official `.pt` files
(`{"state_dict": ...}`). Checked:
- a name loads bit for bit what the path of the same file loads (a segmentation run from a classifier's
  name takes its backbone bit for bit); the second call reads the converted cache (the converter is made
  to fail); a second process (predict) reads it too, through HF_HUB_CACHE;
- logits of the loaded B0 equal timm's on the same weights within 1e-5 * max(1, max|timm|)
  (`assert_close_to_torch`, the parity tolerance);
- a file missing from the offline cache, no network (a closed local port as the Hub), a name without
  published weights, another model's file in the cache and a damaged blob: one line each, nothing written;
- the ImageNet names equal timm's WordNet lemma table class by class, in tfds's imagenet2012 order.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import evit_jax
from evit_jax import predict
from evit_jax.convert import core, hub
from evit_jax.data import imagenet_classes
from evit_jax.models import create_model, get_model_spec, list_models
from tests._reference_weights import assert_close_to_torch
from tests.test_convert import assert_bit_equal, random_state_dict
from tests._reference_weights import randomize_torch_norms

REPO = Path(__file__).resolve().parents[1]


def put_in_hub_cache(cache: Path, repo_id: str, filename: str, data: bytes, *, blob_name: str | None = None) -> Path:
    """Store `data` as huggingface_hub stores a downloaded LFS file: blob named by its sha256, refs/main
    naming the snapshot, the snapshot file a relative symlink to the blob. Returns the snapshot path."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    blob = repo / "blobs" / (blob_name or hashlib.sha256(data).hexdigest())
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    pointer = repo / "snapshots" / revision / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.unlink(missing_ok=True)
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    return pointer


def write_official(tmp_path: Path, name: str) -> Path:
    """An official-layout .pt of random weights ({"state_dict": ...}, as the official repositories serve)."""
    from evit_jax.convert import write_torch_checkpoint

    return write_torch_checkpoint(random_state_dict(name), tmp_path / f"{name}.pt")


def converted_dirs(cache: Path) -> list[Path]:
    return sorted(cache.glob(f"models--*/{hub.CONVERTED_SUBDIR}/*"))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub uses (read at call time from its constants)."""
    from huggingface_hub import constants

    assert constants.is_offline_mode(), "tests must run with HF_HUB_OFFLINE=1 (tests/conftest.py)"
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def timm_b0_safetensors(torch, tmp_path: Path) -> tuple[bytes, object]:
    """(model.safetensors bytes as timm writes them for the hub, the timm model)."""
    import safetensors.torch
    import timm

    model = timm.create_model("efficientvit_b0", pretrained=False).eval()
    randomize_torch_norms(torch, model)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path.read_bytes(), model


def test_timm_weights_by_name(hf_cache, tmp_path, torch, monkeypatch, highest_precision):
    data, timm_model = timm_b0_safetensors(torch, tmp_path)
    file = put_in_hub_cache(hf_cache, "timm/efficientvit_b0.r224_in1k", "model.safetensors", data)

    model, by_name = evit_jax.load_pretrained("efficientvit_b0")              # default tag; converts
    (converted,) = converted_dirs(hf_cache)
    assert converted.name == f"efficientvit_b0-{hashlib.sha256(data).hexdigest()}"
    assert converted.parent.parent == hf_cache / "models--timm--efficientvit_b0.r224_in1k"
    _, by_path = evit_jax.load_pretrained("efficientvit_b0", file)
    assert_bit_equal(by_name, by_path)

    # The second call reads the converted directory: converting again would fail here.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(core, "torch_to_flax", no_conversion)
    mtime = converted.stat().st_mtime_ns
    again_model, again = evit_jax.load_pretrained("efficientvit_b0.r224_in1k")
    assert_bit_equal(again, by_name)
    assert converted.stat().st_mtime_ns == mtime and converted_dirs(hf_cache) == [converted]

    # timm's weights run with timm's numerics: the logits are timm's.
    assert model == again_model == create_model("efficientvit_b0", numerics="timm")
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():
        ref = timm_model(torch.from_numpy(x)).numpy()
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(by_name, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert_close_to_torch(np.asarray(out), ref)

    # Another process finds the same cache through HF_HUB_CACHE and prints ImageNet names.
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "evit_jax.predict", "--checkpoint", "hub:efficientvit_b0",
                          "--image_size", "64", str(image)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line.strip() for line in run.stdout.splitlines() if "p=" in line]
    assert len(lines) == 5
    names = imagenet_classes.imagenet_class_names()
    for rank, line in enumerate(lines, 1):
        label, index = line.split(" (class ")
        assert label == f"{rank}. {names[int(index.split(')')[0])]}"
    assert converted.stat().st_mtime_ns == mtime and converted_dirs(hf_cache) == [converted]


def test_official_seg_weights_by_name(hf_cache, tmp_path, torch):
    name = "efficientvit_seg_b0_cityscapes"
    pt = write_official(tmp_path, name)
    file = put_in_hub_cache(hf_cache, "han-cai/efficientvit-seg", f"{name}.pt", pt.read_bytes())
    weights = hub.find_weights("efficientvit-seg-b0-cityscapes")
    assert (weights.repo_id, weights.filename, weights.input_size) == ("han-cai/efficientvit-seg", file.name, (1024, 2048))
    model, by_name = evit_jax.load_pretrained(name)
    _, by_path = evit_jax.load_pretrained(name, file)
    assert_bit_equal(by_name, by_path)
    assert model == create_model(name)  # official numerics
    # An ImageNet classifier's name for a segmentation model: refused before anything is read.
    with pytest.raises(ValueError, match="holds weights of efficientvit_b1, not efficientvit_seg_b0_cityscapes"):
        evit_jax.load_pretrained(name, "hub:efficientvit_b1")


def test_several_processes_read_the_file_and_write_nothing(hf_cache, tmp_path, monkeypatch, torch):
    data = write_official(tmp_path, "efficientvit_seg_b1_ade20k").read_bytes()
    file = put_in_hub_cache(hf_cache, "han-cai/efficientvit-seg", "efficientvit_seg_b1_ade20k.pt", data)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert hub.resolve_checkpoint("hub:efficientvit_seg_b1_ade20k") == str(file)
    assert converted_dirs(hf_cache) == []


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_file_missing_from_the_offline_cache_is_one_line(hf_cache):
    with pytest.raises(FileNotFoundError) as excinfo:
        evit_jax.load_pretrained("efficientvit_b2.r256_in1k")
    message = _one_line(excinfo)
    assert "timm/efficientvit_b2.r256_in1k/model.safetensors is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message and str(hf_cache) in message
    assert not any(hf_cache.glob(f"**/{hub.CONVERTED_SUBDIR}"))


def test_no_network_is_one_line(hf_cache, monkeypatch):
    """Online mode, but the Hub cannot be reached: the endpoint is a closed port on this machine."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    # huggingface_hub retries a failed metadata request 5 times with backoff (~24 s); once is enough here.
    from huggingface_hub import file_download

    monkeypatch.setattr(file_download, "_DEFAULT_RETRY_ON_EXCEPTIONS", ())
    with pytest.raises(FileNotFoundError) as excinfo:
        hub.resolve_checkpoint("hub:efficientvit_l1")
    message = _one_line(excinfo)
    assert "timm/efficientvit_l1.r224_in1k/model.safetensors is not in the Hugging Face cache" in message
    assert "the Hugging Face Hub cannot be reached (no network?)" in message
    assert converted_dirs(hf_cache) == []


@pytest.mark.parametrize("name, expected", [
    ("efficientvit_backbone_b1", "is a bare backbone; no weights are published for backbones alone (hub:efficientvit_b1"),
    ("efficientvit_backbone_l0", "is a bare backbone; no weights are published for backbones alone. Models"),
    ("efficientvit_v1_b1", "is a paper-v1 block design"),
    ("efficientvit_seg_v1_b1_ade20k", "is a paper-v1 block design"),
    ("efficientvit_seg_b0_ade20k", "unknown model 'efficientvit_seg_b0_ade20k': did you mean"),
    ("efficientvit_b1.r320_in1k", "has no weights tagged 'r320_in1k'; available tags: r224_in1k, r256_in1k, r288_in1k"),
    ("efficientvit_seg_b1_cityscapes.r224", "it has one weight: drop the tag"),
])
def test_names_without_published_weights_are_one_line(hf_cache, name, expected):
    with pytest.raises(ValueError) as excinfo:
        hub.resolve_checkpoint(f"hub:{name}")
    message = _one_line(excinfo)
    assert message.startswith(f"hub:{name}: ") and expected in message


def test_train_config_check_accepts_hub_names_without_downloading(hf_cache):
    from configs import demo
    from evit_jax.train import loop

    config = demo.get_config()
    config.init_from = "hub:efficientvit_b0"
    loop._check_config(config)                     # a published name passes; nothing is read or downloaded
    config.init_from = "hub:efficientvit_v1_b0"
    with pytest.raises(ValueError, match="paper-v1 block design"):
        loop._check_config(config)
    assert not any(hf_cache.iterdir())


def test_segmentation_training_takes_the_backbone_of_a_hub_classifier(hf_cache, tmp_path, torch, data_dir):
    from configs import demo_seg
    from evit_jax.convert import load_variables
    from evit_jax.tasks import get_task
    from evit_jax.train import loop

    data, _ = timm_b0_safetensors(torch, tmp_path)
    file = put_in_hub_cache(hf_cache, "timm/efficientvit_b0.r224_in1k", "model.safetensors", data)
    config = demo_seg.get_config("smoke")            # efficientvit_seg_b0_cityscapes
    config.data.data_dir = data_dir
    config.init_from = "hub:efficientvit_b0"
    loop._check_config(config)
    task = get_task(config)
    loaded = loop._load_variables(config, task)
    classifier = load_variables(file, "efficientvit_b0")
    assert set(loaded["params"]) == {"backbone"} and task.keeps_fresh_init("params/head/x")
    assert_bit_equal({k: {"backbone": v["backbone"]} for k, v in classifier.items()}, loaded)


def test_another_models_file_in_the_cache_is_one_line(hf_cache, tmp_path, torch):
    data, _ = timm_b0_safetensors(torch, tmp_path)
    put_in_hub_cache(hf_cache, "timm/efficientvit_b1.r224_in1k", "model.safetensors", data)
    with pytest.raises(ValueError) as excinfo:
        evit_jax.load_pretrained("efficientvit_b1")
    message = _one_line(excinfo)
    assert "does not hold efficientvit_b1 weights" in message and "most likely belongs to efficientvit_b0" in message
    assert converted_dirs(hf_cache) == [] and not list(hf_cache.glob("**/.efficientvit_b1*"))


def test_damaged_download_is_one_line(hf_cache, tmp_path, torch):
    data = write_official(tmp_path, "efficientvit_seg_b0_cityscapes").read_bytes()
    blob_name = hashlib.sha256(data).hexdigest()
    put_in_hub_cache(hf_cache, "han-cai/efficientvit-seg", "efficientvit_seg_b0_cityscapes.pt", data[: len(data) // 2],
                     blob_name=blob_name)
    with pytest.raises(ValueError) as excinfo:
        hub.resolve_checkpoint("hub:efficientvit_seg_b0_cityscapes")
    message = _one_line(excinfo)
    assert "is damaged or truncated" in message and f"{len(data) // 2} bytes" in message and blob_name in message
    assert converted_dirs(hf_cache) == []


def test_table_covers_the_zoo():
    names = hub.list_pretrained()
    assert len(names) == len(set(names)) == 32
    models = {hub.find_weights(n).model for n in names}
    # Every released classification and segmentation model of the zoo has weights; the rest have none.
    released = {m for m in list_models() if get_model_spec(m).design == "v2"
                and get_model_spec(m).task in ("classification", "segmentation")}
    assert models == released
    for weights in hub.WEIGHTS:
        assert hub.find_weights(weights.name) is weights
        if weights.crop_ratio is not None:
            assert weights.input_size == (int(weights.tag[1:4]),) * 2 and 0.9 <= weights.crop_ratio <= 1.0
    assert hub.find_weights("efficientvit_l2").tag == "r224_in1k"


def test_imagenet_class_names_match_timm_and_tfds():
    import tensorflow_datasets as tfds

    synsets = imagenet_classes.imagenet_synsets()
    labels = Path(tfds.__file__).parent / "datasets" / "imagenet2012" / "labels.txt"
    assert list(synsets) == labels.read_text().split()
    pytest.importorskip("timm")
    from timm.data import ImageNetInfo

    timm_info = ImageNetInfo()
    names = imagenet_classes.imagenet_class_names()
    assert [timm_info.index_to_description(i) for i in range(1000)] == list(names)
    assert names[281] == "tabby, tabby cat"
    assert imagenet_classes.readable_class_names(["n02123045", "disc"]) == ["tabby, tabby cat", "disc"]


def test_predict_names_for_datasets_and_imagenet():
    b0, seg = get_model_spec("efficientvit_b0"), get_model_spec("efficientvit_seg_b0_cityscapes")
    assert predict.class_names_for(b0, 1000, {})[0] == "tench, Tinca tinca"
    assert predict.class_names_for(b0, 10, {}) is None
    assert predict.class_names_for(seg, 19, {})[0] == "road"
