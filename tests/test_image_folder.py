"""Image-folder datasets: both layouts, stored bytes, decoding, skipped files, every error."""

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from evit_jax.data import image_folder, pipeline, prepare, sources, transforms


def _pixels(seed, height=20, width=28):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 8, y * 10, (x + y) * 4], -1) + rng.integers(0, 40, (height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def _save(path, image: Image.Image, fmt, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, fmt, **kwargs)


def _write_jpeg(path, seed, mode="RGB"):
    _save(path, Image.fromarray(_pixels(seed)).convert(mode), "JPEG", quality=90)


def _write_png(path, seed, mode="RGB"):
    image = Image.fromarray(_pixels(seed))
    image = image.quantize(16) if mode == "P" else image.convert(mode)
    _save(path, image, "PNG")


def _write_png16(path, seed):
    """A 16-bit RGB PNG (Pillow cannot write one): PIL reads it as 8-bit RGB, OpenCV as uint16."""
    import struct
    import zlib

    pixels = (_pixels(seed).astype(">u2") * 257)
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, 2, 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                + chunk(b"IEND", b""))


def _class_folder_layout(root):
    """bird: 4 (one nested), cat: 5 + a text file + a corrupt JPEG, dog: 8 of odd formats."""
    for i in range(3):
        _write_jpeg(f"{root}/bird/b{i}.jpg", i)
    _write_png(f"{root}/bird/nested/deep.png", 3)
    for i in range(4):
        _write_jpeg(f"{root}/cat/c{i}.jpeg", 10 + i)
    _write_png(f"{root}/cat/c4.png", 14)
    with open(f"{root}/cat/notes.txt", "w") as f:
        f.write("not an image\n")
    with open(f"{root}/cat/broken.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(7))   # a JPEG header cut short
    _write_jpeg(f"{root}/dog/cmyk.jpg", 20, "CMYK")
    _write_jpeg(f"{root}/dog/grey.jpg", 21, "L")
    _write_png(f"{root}/dog/palette.png", 22, "P")
    _write_png(f"{root}/dog/alpha.png", 23, "RGBA")
    _save(f"{root}/dog/keyed.png", Image.fromarray(_pixels(26)), "PNG", transparency=(0, 0, 0))
    _write_png16(f"{root}/dog/deep16.png", 27)
    _save(f"{root}/dog/bitmap.bmp", Image.fromarray(_pixels(24)), "BMP")
    _write_jpeg(f"{root}/dog/d0.jpg", 25)


def _train_val_layout(root):
    for split, count in (("train", 3), ("val", 2)):
        for name in ("ant", "bee"):
            for i in range(count):
                _write_jpeg(f"{root}/{split}/{name}/{i}.jpg", hash((split, name, i)) % 1000)


def _raw_records(name, split, data_dir):
    builder = tfds.builder_from_directory(os.path.join(data_dir, name, "1.0.0"))
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def _reference_pixels(path):
    """torchvision's ImageFolder loader: PIL open + convert('RGB')."""
    with open(path, "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def test_class_folders_become_a_classification_dataset(tmp_path, capsys):
    src, data_dir = tmp_path / "pets", str(tmp_path / "data")
    _class_folder_layout(src)
    assert prepare.main(["image_folder", "--name", "pets", "--src", str(src), "--data_dir", data_dir,
                         "--val_fraction", "0.25", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert "skipped cat/notes.txt: not an image" in err
    assert "skipped cat/broken.jpg: corrupt image" in err and "2 file(s) skipped" in err
    assert "pets: 3 classes, train=" in out

    info = sources.get_info("pets", data_dir)
    assert (info.task, info.class_names, info.image_key, info.label_key) == (
        "classification", ("bird", "cat", "dog"), "image", "label")
    # Stratified: round(0.25 * n) of each class (4, 5, 8 images) in validation.
    assert info.split_sizes == {"train": 3 + 4 + 6, "validation": 1 + 1 + 2}

    seen = []
    for split in ("train", "validation"):
        source = sources.get_source("pets", split, data_dir)
        raw = _raw_records("pets", split, data_dir)
        for i in range(len(source)):
            example, record = source[i], raw[i]
            rel = example["file_name"].decode() if isinstance(example["file_name"], bytes) else example["file_name"]
            seen.append(rel)
            path = os.path.join(src, rel)
            assert info.class_names[int(example["label"])] == rel.split("/")[0]
            # What tfds decodes is exactly what torchvision's loader gives.
            np.testing.assert_array_equal(example["image"], _reference_pixels(path))
            with open(path, "rb") as f:
                original = f.read()
            if rel.split("/")[-1] in ("cmyk.jpg", "grey.jpg", "palette.png", "alpha.png", "bitmap.bmp",
                                      "keyed.png", "deep16.png"):
                assert record["image"][:8] == b"\x89PNG\r\n\x1a\n"     # converted, losslessly
            else:
                assert record["image"] == original                   # stored as given
    assert sorted(seen) == sorted(
        os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/") for d, _, fs in os.walk(src) for f in fs
        if f not in ("notes.txt", "broken.jpg"))

    # The same seed gives the same split; the name is now taken.
    plan = image_folder.scan_folder(str(src), 0.25, seed=3)
    assert {rel for rel, _ in plan.splits["validation"]} == {
        s for s in seen[info.split_sizes["train"]:]}
    assert prepare.main(["image_folder", "--name", "pets", "--src", str(src), "--data_dir", data_dir]) == 2
    assert "is taken" in capsys.readouterr().err

    # What the classification task runs on it: the official train transform through grain.
    iterator = pipeline.make_train_iterator(
        sources.get_source("pets", "train", data_dir),
        transforms.ClassificationTrainTransform(randaugment=(2, 5), erasing_prob=0.2,
                                                image_key=info.image_key, label_key=info.label_key),
        global_batch_size=4, image_sizes=[32], seed=0, process_index=0, process_count=1)
    batch = next(iterator)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["erase_box"].shape == (4, 4)


def test_train_and_val_folders_are_the_splits(tmp_path):
    src, data_dir = tmp_path / "insects", str(tmp_path / "data")
    _train_val_layout(src)
    # What an interrupted earlier attempt leaves behind does not take the name.
    os.makedirs(os.path.join(data_dir, "insects", "incomplete.ABC123_1.0.0"))
    lines = []
    builder = image_folder.prepare_image_folder("insects", str(src), data_dir, report=lines.append)
    assert lines == []
    info = sources.get_info("insects", data_dir)
    assert info.class_names == ("ant", "bee") and info.split_sizes == {"train": 6, "validation": 4}
    val = sources.get_source("insects", "validation", data_dir)
    names = [val[i]["file_name"] for i in range(len(val))]
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    assert names == ["val/ant/0.jpg", "val/ant/1.jpg", "val/bee/0.jpg", "val/bee/1.jpg"]
    assert [int(val[i]["label"]) for i in range(4)] == [0, 0, 1, 1]
    assert builder.info.metadata["evit_task"] == "classification"


def test_stratified_split_is_deterministic_and_per_class():
    paths = [[f"c{c}/{i}" for i in range(n)] for c, n in enumerate((10, 3, 1, 40))]
    train, val = image_folder.stratified_split(paths, 0.2, seed=0)
    again = image_folder.stratified_split(paths, 0.2, seed=0)
    other = image_folder.stratified_split(paths, 0.2, seed=1)
    assert (train, val) == again and val != other[1]
    per_class = np.bincount([label for _, label in val], minlength=4)
    assert per_class.tolist() == [2, 1, 0, 8]                  # round(0.2 n), at most n - 1
    assert sorted(train + val) == sorted((p, c) for c, ps in enumerate(paths) for p in ps)


def _error(tmp_path, capsys, argv):
    data_dir = tmp_path / "data"
    code = prepare.main(["image_folder", "--data_dir", str(data_dir)] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not data_dir.exists() or not any(data_dir.iterdir()), "something was written"
    return err[0]


def test_every_bad_input_is_one_line_before_anything_is_written(tmp_path, capsys):
    def layout(name):
        return tmp_path / name

    _class_folder_layout(layout("ok"))
    os.makedirs(layout("empty_class") / "a")
    _write_jpeg(f"{layout('empty_class')}/b/0.jpg", 0)
    with open(layout("empty_class") / "a" / "readme.txt", "w") as f:
        f.write("x")
    _train_val_layout(layout("mismatch"))
    _write_jpeg(f"{layout('mismatch')}/train/cow/0.jpg", 1)
    _write_jpeg(f"{layout('train_only')}/train/a/0.jpg", 0)
    os.makedirs(layout("no_images") / "a")
    with open(layout("no_images") / "a" / "x.txt", "w") as f:
        f.write("x")
    os.makedirs(layout("flat"))
    _write_jpeg(f"{layout('flat')}/0.jpg", 0)
    _train_val_layout(layout("both"))

    cases = [
        (["--name", "x1", "--src", str(layout("empty_class"))], "class folder(s) without images"),
        (["--name", "x2", "--src", str(layout("mismatch"))], "only in train/: cow; only in val/: -"),
        (["--name", "x3", "--src", str(layout("train_only"))], "has train/ but no val/"),
        (["--name", "x4", "--src", str(layout("no_images"))], "no images found"),
        (["--name", "x5", "--src", str(layout("flat"))], "no class sub-folders (1 file(s) directly in it)"),
        (["--name", "x6", "--src", str(layout("missing"))], "does not exist"),
        (["--name", "x7", "--src", str(layout("both")), "--val_fraction", "0.2"], "--val_fraction does not apply"),
        (["--name", "x8", "--src", str(layout("ok")), "--val_fraction", "1.5"], "--val_fraction must be in (0, 1)"),
        (["--name", "x9", "--src", str(layout("ok")), "--val_fraction", "0.01"], "validation split empty"),
        (["--name", "Bad-Name", "--src", str(layout("ok"))], "dataset name"),
        (["--name", "evit_shapes", "--src", str(layout("ok"))], "built-in dataset"),
    ]
    for argv, message in cases:
        assert message in _error(tmp_path, capsys, argv), argv
    # A full check decodes every image: a JPEG whose body is cut off passes the header check only.
    truncated = layout("truncated")
    _train_val_layout(truncated)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8)).save(big, "JPEG")
    with open(truncated / "train" / "ant" / "cut.jpg", "wb") as f:
        f.write(big.getvalue()[:len(big.getvalue()) // 2])
    assert image_folder.check_image_file(str(truncated / "train" / "ant" / "cut.jpg")) is None
    plan = image_folder.scan_folder(str(truncated), full_check=True)
    assert [rel for rel, _ in plan.skipped] == ["train/ant/cut.jpg"] and "truncated" in plan.skipped[0][1]
