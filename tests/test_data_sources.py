"""Dataset registry, the evit_shapes builder and its learnability guard."""

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from evit_jax.data import sources, synthetic_cls

TINY = "evit_shapes/tiny"


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_builder_writes_and_reads_back_every_example(data_dir):
    config = synthetic_cls.EvitShapes.builder_configs["tiny"]
    for split, size in (("train", config.num_train), ("test", config.num_test)):
        source = sources.get_source(TINY, split, data_dir)
        assert len(source) == size
        stored = {(_digest(ex["image"]), int(ex["label"])) for ex in
                  (source[i] for i in range(len(source)))}
        expected = set()
        for index in range(size):
            image, label = synthetic_cls.generate_example(split, index, config.image_size)
            expected.add((_digest(image), label))
        assert stored == expected  # PNG is lossless: the exact generated pixels come back.
        first = source[0]
        assert first["image"].shape == (config.image_size,) * 2 + (3,)
        assert first["image"].dtype == np.uint8


def test_generation_is_deterministic_per_index():
    a_image, a_label = synthetic_cls.generate_example("train", 7)
    b_image, b_label = synthetic_cls.generate_example("train", 7)
    c_image, _ = synthetic_cls.generate_example("train", 8)
    d_image, _ = synthetic_cls.generate_example("test", 7)
    assert a_label == b_label and np.array_equal(a_image, b_image)
    assert not np.array_equal(a_image, c_image)
    assert not np.array_equal(a_image, d_image)
    assert a_image.shape == (64, 64, 3) and a_image.dtype == np.uint8


def test_get_info(data_dir):
    info = sources.get_info(TINY, data_dir)
    assert info.num_classes == 10
    assert info.class_names == synthetic_cls.CLASS_NAMES
    assert info.split_sizes == {"train": 300, "test": 70}
    assert info.ignore_index is None
    assert (info.image_key, info.label_key, info.task) == ("image", "label", "classification")


def test_missing_real_dataset_names_data_dir_and_command(tmp_path):
    data_dir = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError) as error:
        sources.get_source("imagenet2012", "train", data_dir)
    message = str(error.value)
    assert "\n" not in message
    assert data_dir in message
    assert "tfds build imagenet2012" in message and "--file_format=array_record" in message
    assert f"--data_dir={data_dir}" in message
    with pytest.raises(FileNotFoundError):
        sources.get_info("imagenet2012", data_dir)
    assert not os.path.exists(data_dir)  # Nothing was written before failing.


def test_bad_names_and_splits(data_dir):
    with pytest.raises(FileNotFoundError, match="Unknown dataset 'imagenet'.*imagenet2012.*prepare image_folder --name imagenet"):
        sources.get_source("imagenet", "train", data_dir)
    with pytest.raises(ValueError, match="Unknown config 'huge'"):
        sources.get_source("evit_shapes/huge", "train", data_dir)
    with pytest.raises(ValueError, match="no split 'validation'"):
        sources.get_source(TINY, "validation", data_dir)


def test_home_relative_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(sources.get_source(TINY, "test", "~/datasets")) == 70
    version = str(synthetic_cls.EvitShapes.VERSION)
    assert (tmp_path / "datasets" / "evit_shapes" / "tiny" / version).is_dir()


def test_split_slicing(data_dir):
    assert len(sources.get_source(TINY, "train[:10%]", data_dir)) == 30


def test_concurrent_builds_in_two_processes(tmp_path):
    # Two processes race to build the same dataset; the file lock makes one build it and
    # the other wait and reuse it.
    script = textwrap.dedent(f"""
        from evit_jax.data import sources
        print(len(sources.get_source({TINY!r}, "test", {str(tmp_path)!r})))
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "70"
    versions = os.listdir(tmp_path / "evit_shapes" / "tiny")
    # One finished build and no leftover temporary folders.
    assert versions == [str(synthetic_cls.EvitShapes.VERSION)], versions


def test_remote_style_build_waits_for_process_zero(tmp_path, monkeypatch):
    builder = sources._make_builder(TINY, str(tmp_path))
    monkeypatch.setattr(sources, "_BUILD_WAIT_S", 0.2)
    monkeypatch.setattr(sources, "_BUILD_POLL_S", 0.05)
    with pytest.raises(TimeoutError, match="process 0"):
        sources._build_on_remote(builder, TINY, process_index=lambda: 1)
    sources._build_on_remote(builder, TINY, process_index=lambda: 0)
    assert builder.is_prepared()
    sources._build_on_remote(builder, TINY, process_index=lambda: 1)  # Returns at once.


def test_mean_colour_classifier_is_near_chance():
    """Colour is independent of class: nearest centroids on mean colour stay near 10%."""
    def sample(split, n):
        examples = [synthetic_cls.generate_example(split, i) for i in range(n)]
        return (np.stack([e[0] for e in examples]).astype(np.float32),
                np.array([e[1] for e in examples]))

    train_x, train_y = sample("train", 1000)
    test_x, test_y = sample("test", 400)

    def nearest_centroid_accuracy(train_features, test_features):
        centroids = np.stack([train_features[train_y == c].mean(0) for c in range(10)])
        distances = ((test_features[:, None] - centroids[None]) ** 2).sum(-1)
        return float((distances.argmin(1) == test_y).mean())

    mean_colour = nearest_centroid_accuracy(train_x.mean((1, 2)), test_x.mean((1, 2)))
    assert mean_colour < 0.3, mean_colour
    assert all((train_y == c).sum() > 50 for c in range(10))  # Classes are balanced-ish.


def test_user_named_dataset_reads_back_without_its_builder(tmp_path):
    """A dataset prepared under a name of the user's reads back from data_dir/NAME through its stored
    metadata; the same builder class prepares any number of names."""
    import io

    import PIL.Image
    import tensorflow_datasets as tfds

    class _Folder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["cat", "dog"])}),
                metadata=tfds.core.MetadataDict(evit_task="classification"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(5), "validation": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                buffer = io.BytesIO()
                PIL.Image.fromarray(np.full((6, 8, 3), i, np.uint8)).save(buffer, "PNG")
                yield i, {"image": buffer.getvalue(), "label": i % 2}

    for name in ("pets", "pets_copy"):
        sources.named_builder_class(_Folder, name)(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    info = sources.get_info("pets", str(tmp_path))
    assert (info.task, info.num_classes, info.class_names, info.split_sizes) == (
        "classification", 2, ("cat", "dog"), {"train": 5, "validation": 2})
    example = sources.get_source("pets_copy", "train", str(tmp_path))[3]
    assert example["image"].shape == (6, 8, 3) and int(example["label"]) == 1
    for bad in ("evit_shapes", "Pets", "9lives", "a-b"):
        with pytest.raises(ValueError, match="dataset name"):
            sources.named_builder_class(_Folder, bad)
