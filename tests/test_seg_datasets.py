"""Cityscapes / ADE20K builders and the prepare entry point on tiny trees in the real layout."""

import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from evit_jax.data import ade20k, cityscapes, prepare, sources

CITY_SAMPLES = {"train": [("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")],
                "val": [("lindau", "lindau_000000_000019")]}
ADE_SAMPLES = {"training": ["ADE_train_00000001", "ADE_train_00000002"],
               "validation": ["ADE_val_00000001"]}


def _save(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _city_tree(root, rng):
    """leftImg8bit/ + gtFine/ with label ids covering 0..40; returns {image name: raw ids}."""
    raw_labels = {}
    for split, samples in CITY_SAMPLES.items():
        for city, stem in samples:
            image = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
            raw = rng.integers(0, 41, (8, 16), dtype=np.uint8)
            name = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
            _save(os.path.join(root, name), image)
            _save(os.path.join(root, f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"), raw)
            # Other gtFine files sit beside the label ids in the real archive.
            _save(os.path.join(root, f"gtFine/{split}/{city}/{stem}_gtFine_color.png"), image)
            raw_labels[name] = (image, raw)
    return raw_labels


def _ade_tree(root, rng):
    """ADEChallengeData2016/ with one grey JPEG; returns {image name: (rgb, raw annotation)}."""
    samples = {}
    for split, stems in ADE_SAMPLES.items():
        for k, stem in enumerate(stems):
            grey = k == 1
            shape = (12, 10) if grey else (10, 14, 3)
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            raw = rng.integers(0, 151, shape[:2], dtype=np.uint8)
            raw[0, :2] = (0, 150)  # "other" and the last class always appear.
            name = f"ADEChallengeData2016/images/{split}/{stem}.jpg"
            _save(os.path.join(root, name), image, quality=95)
            _save(os.path.join(root, f"ADEChallengeData2016/annotations/{split}/{stem}.png"), raw)
            decoded = np.asarray(Image.open(os.path.join(root, name)).convert("RGB"))
            samples[name] = (decoded, raw)
    return samples


def _zip_folders(root, zip_path, folders):
    with zipfile.ZipFile(zip_path, "w") as archive:
        for folder in folders:
            for dirpath, _, files in os.walk(os.path.join(root, folder)):
                for f in files:
                    full = os.path.join(dirpath, f)
                    archive.write(full, os.path.relpath(full, root))


def _records(builder, split):
    source = builder.as_data_source(split)
    return {source[i]["file_name"].decode(): source[i] for i in range(len(source))}


def _expected_city(raw):
    expected = np.full(raw.shape, 255, np.uint8)
    for label_id, train_id in cityscapes.LABEL_ID_TO_TRAIN_ID.items():
        expected[raw == label_id] = train_id
    return expected


def test_cityscapes_label_table_is_the_official_one():
    table = cityscapes.LABEL_TABLE
    assert table[7] == 0 and table[8] == 1 and table[11] == 2 and table[33] == 18
    assert table[24] == 11 and table[26] == 13 and table[31] == 16
    assert sorted(cityscapes.LABEL_ID_TO_TRAIN_ID.values()) == list(range(19))
    for void in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255):
        assert table[void] == 255


@pytest.mark.parametrize("zipped", [False, True])
def test_cityscapes_builds_with_train_ids(tmp_path, zipped):
    src = tmp_path / "src"
    samples = _city_tree(str(src), np.random.default_rng(0))
    if zipped:
        zips = tmp_path / "zips"
        zips.mkdir()
        _zip_folders(str(src), str(zips / cityscapes.ZIPS[0]), ["leftImg8bit"])
        _zip_folders(str(src), str(zips / cityscapes.ZIPS[1]), ["gtFine"])
        src = zips
    data_dir = str(tmp_path / "data")
    builder = prepare.prepare("cityscapes", data_dir, str(src))
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 2, "validation": 1}
    for split in ("train", "validation"):
        for name, record in _records(builder, split).items():
            image, raw = samples[name]
            assert np.array_equal(record["image"], image)
            assert np.array_equal(record["segmentation_mask"][..., 0], _expected_city(raw))
    # The registry of the data engineer reads what we prepared.
    info = sources.get_info("cityscapes", data_dir)
    assert (info.num_classes, info.ignore_index) == (19, 255)
    assert len(sources.get_source("cityscapes", "validation", data_dir)) == 1


def test_cityscapes_missing_folder_fails_before_writing(tmp_path):
    src = tmp_path / "src"
    _city_tree(str(src), np.random.default_rng(1))
    for path in (src / "gtFine" / "val").rglob("*"):
        if path.is_file():
            path.unlink()
    os.removedirs(src / "gtFine" / "val" / "lindau")
    data_dir = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match=r"folder gtFine/val/"):
        prepare.prepare("cityscapes", str(data_dir), str(src))
    # The builder itself checks too (e.g. when driven by tfds directly).
    builder = cityscapes.Cityscapes(data_dir=str(data_dir), file_format="array_record")
    import tensorflow_datasets as tfds
    with pytest.raises(FileNotFoundError, match=r"gtFine/val/"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(src)))
    assert not data_dir.exists() or not any(data_dir.rglob("*.array_record*"))
    assert not (data_dir / "evit_cityscapes").exists()


def test_cityscapes_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/ \(or leftImg8bit_trainvaltest.zip\)"):
        cityscapes.Cityscapes.check_manual_dir(str(tmp_path))
    src = tmp_path / "src"
    _city_tree(str(src), np.random.default_rng(2))
    (src / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"label gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"):
        cityscapes.Cityscapes.check_manual_dir(str(src))


@pytest.mark.parametrize("layout", ["root", "parent", "zip"])
def test_ade20k_builds_with_mask_minus_one(tmp_path, layout):
    parent = tmp_path / "src"
    samples = _ade_tree(str(parent), np.random.default_rng(3))
    src = {"root": parent / "ADEChallengeData2016", "parent": parent}.get(layout)
    if layout == "zip":
        src = tmp_path / "zip"
        src.mkdir()
        _zip_folders(str(parent), str(src / ade20k.ZIP), ["ADEChallengeData2016"])
    data_dir = str(tmp_path / "data")
    builder = prepare.prepare("ade20k", data_dir, str(src))
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 2, "validation": 1}
    prefix = "" if layout == "root" else "ADEChallengeData2016/"
    for split in ("train", "validation"):
        for name, record in _records(builder, split).items():
            image, raw = samples["ADEChallengeData2016/" + name[len(prefix):]]
            assert record["image"].shape == image.shape[:2] + (3,)   # grey JPEG -> RGB
            assert np.array_equal(record["image"], image)            # original JPEG bytes kept
            mask = record["segmentation_mask"][..., 0]
            expected = np.where(raw == 0, 255, raw.astype(np.int32) - 1)
            assert np.array_equal(mask, expected)
            assert mask[0, 0] == 255 and mask[0, 1] == 149 and set(np.unique(mask)) <= set(range(150)) | {255}
    assert sources.get_info("ade20k", data_dir).num_classes == 150


def test_ade20k_label_rule_and_missing_folder(tmp_path):
    raw = np.array([[0, 1, 2], [150, 151, 255]])
    assert ade20k.Ade20k.map_label(raw).tolist() == [[255, 0, 1], [149, 255, 255]]
    with pytest.raises(FileNotFoundError, match=r"folder ADEChallengeData2016/"):
        ade20k.Ade20k.check_manual_dir(str(tmp_path))
    _ade_tree(str(tmp_path), np.random.default_rng(4))
    for f in (tmp_path / "ADEChallengeData2016/annotations/validation").iterdir():
        f.unlink()
    (tmp_path / "ADEChallengeData2016/annotations/validation").rmdir()
    data_dir = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match=r"folder ADEChallengeData2016/annotations/validation/"):
        prepare.prepare("ade20k", str(data_dir), str(tmp_path))
    assert not data_dir.exists()


def test_prepare_cli(tmp_path, capsys):
    assert prepare.main(["cityscapes", "--src", str(tmp_path / "nowhere"),
                         "--data_dir", str(tmp_path / "d")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert prepare.main(["ade20k", "--data_dir", str(tmp_path / "d")]) == 2
    assert "needs --src" in capsys.readouterr().err
    assert prepare.main(["evit_seg_shapes", "--config", "nope", "--data_dir", str(tmp_path / "d")]) == 2
    assert "Unknown config" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert prepare.main(["evit_seg_shapes", "--config", "tiny", "--data_dir", str(tmp_path / "d")]) == 0
    assert "train=96, validation=32" in capsys.readouterr().out
    assert prepare.main(["evit_shapes", "--config", "tiny", "--data_dir", str(tmp_path / "d")]) == 0
    assert "train=300" in capsys.readouterr().out
