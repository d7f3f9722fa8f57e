"""Detection datasets: evit_det_shapes (generation, read-back, not trivially solvable), COCO 2017
and COCO-format JSON preparation on tiny trees (read-back, category mapping, crowds), every bad
input rejected in one line before anything is written, and the CLI."""

import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from evit_jax.data import coco, prepare, sources, synthetic_det

pytest.importorskip("pycocotools")


# ----------------------------------------------------------------------------- evit_det_shapes
def test_det_shapes_reads_back_every_generated_example(data_dir):
    info = sources.get_info("evit_det_shapes/tiny", data_dir)
    assert (info.task, info.num_classes, info.label_key) == ("detection", 6, "objects")
    assert info.class_names == ("disc", "square", "triangle", "cross", "ring", "star")
    assert info.category_ids == (1, 2, 3, 4, 5, 6) and info.split_sizes == {"train": 64, "validation": 32}
    for split in ("train", "validation"):
        source = sources.get_source("evit_det_shapes/tiny", split, data_dir)
        for i in range(len(source)):
            image, boxes, labels = synthetic_det.generate_example(split, i, 64)
            record = source[i]
            assert np.array_equal(record["image"], image) and int(record["image_id"]) == i
            np.testing.assert_array_equal(record["objects"]["bbox"], boxes)
            np.testing.assert_array_equal(record["objects"]["label"], labels)
            assert not record["objects"]["is_crowd"].any()
            assert 1 <= len(labels) <= 4 and labels.max() < 6
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()


def test_det_shapes_are_deterministic_varied_and_visible():
    a = synthetic_det.generate_example("train", 5)
    b = synthetic_det.generate_example("train", 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    sides, counts, classes = [], [], []
    for i in range(60):
        image, boxes, labels = synthetic_det.generate_example("validation", i)
        sides += list(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        counts.append(len(labels))
        classes += labels.tolist()
    assert min(sides) < 24 and max(sides) > 60           # small to large at 128 px
    assert set(counts) == {1, 2, 3, 4} and set(classes) == set(range(6))


def test_det_shapes_central_box_predictor_scores_low():
    """One box per class at the image centre (the mean box size), for every image: AP50 stays low,
    so the dataset cannot be solved without finding the objects."""
    from evit_jax.tasks import det_metrics

    images = [synthetic_det.generate_example("validation", i) for i in range(100)]
    objects = [{"bbox": b, "label": l, "is_crowd": np.zeros(len(l), bool),
                "area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])} for _, b, l in images]
    annotations = coco.SplitAnnotations(np.arange(100), np.full((100, 2), 128), objects)
    gt = det_metrics.coco_ground_truth(annotations, synthetic_det.CATEGORY_IDS, synthetic_det.CLASS_NAMES)
    side = np.mean([np.sqrt(o["area"]).mean() for o in objects])
    box = [64 - side / 2, 64 - side / 2, 64 + side / 2, 64 + side / 2]
    rows = [(i, box, 0.5, c) for i in range(100) for c in range(6)]
    ids, boxes, scores, classes = (np.array(v) for v in zip(*rows))
    metrics, _ = det_metrics.coco_evaluate(gt, det_metrics.Detections(ids, boxes, scores, classes))
    assert metrics["AP50"] < 0.05 and metrics["AP"] < 0.02, metrics


# ----------------------------------------------------------------------------- COCO-format trees
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 12, "name": "emu"}]   # unsorted


def _png(rng, hw):
    return rng.integers(0, 256, hw + (3,), dtype=np.uint8)


def _write_split(root, folder, specs, rng, grey_first=False):
    """Images under root/folder and their COCO dict; specs = [(image_id, (h, w), [ann...])]."""
    images, annotations, pixels = [], [], {}
    for k, (image_id, hw, anns) in enumerate(specs):
        name = f"{image_id:06d}.png" if k % 2 == 0 else f"{image_id:06d}.jpg"
        array = _png(rng, hw)
        path = os.path.join(root, folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if grey_first and k == 0:
            Image.fromarray(array[..., 0]).save(path, format="PNG")
            array = np.repeat(array[..., :1], 3, axis=-1)
        elif name.endswith(".jpg"):
            Image.fromarray(array).save(path, format="JPEG", quality=95)
            array = np.asarray(Image.open(path).convert("RGB"))
        else:
            Image.fromarray(array).save(path, format="PNG")
        pixels[image_id] = array
        images.append({"id": image_id, "file_name": name, "width": hw[1], "height": hw[0]})
        for ann in anns:
            annotations.append({"id": len(annotations) + 100, "image_id": image_id, **ann})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}, pixels


TRAIN = [(5, (40, 60), [{"category_id": 3, "bbox": [1.5, 2.0, 20.0, 10.5], "area": 150.0, "iscrowd": 0},
                        {"category_id": 12, "bbox": [30, 20, 30, 20.5], "area": 500.0, "iscrowd": 0},   # 0.5 px out
                        {"category_id": 7, "bbox": [0, 0, 60, 40], "area": 900.0, "iscrowd": 1}]),
         (9, (32, 32), [{"category_id": 7, "bbox": [4, 4, 0.5, 10]}]),                             # degenerate, no area
         (2, (24, 36), [])]
VAL = [(1, (30, 40), [{"category_id": 12, "bbox": [5, 5, 10, 10], "area": 80.0, "iscrowd": 0}])]


def _coco_json_tree(tmp_path, train=TRAIN, val=VAL):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    train_json, train_pixels = _write_split(str(images), "", train, rng, grey_first=True)
    val_json, val_pixels = _write_split(str(images), "", val, rng)
    (tmp_path / "train.json").write_text(json.dumps(train_json))
    (tmp_path / "val.json").write_text(json.dumps(val_json))
    return str(images), str(tmp_path / "train.json"), str(tmp_path / "val.json"), {**train_pixels, **val_pixels}


def _check_records(builder_source, specs, pixels):
    by_id = {int(builder_source[i]["image_id"]): builder_source[i] for i in range(len(builder_source))}
    assert sorted(by_id) == sorted(s[0] for s in specs)
    class_of = {3: 0, 7: 1, 12: 2}
    for image_id, hw, anns in specs:
        record = by_id[image_id]
        assert np.array_equal(record["image"], pixels[image_id])
        objects = record["objects"]
        expected = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in anns], np.float64).reshape(-1, 4)
        np.testing.assert_array_equal(objects["bbox"], expected)          # as in the JSON: not clipped
        assert objects["label"].tolist() == [class_of[a["category_id"]] for a in anns]
        assert objects["is_crowd"].tolist() == [bool(a.get("iscrowd", 0)) for a in anns]
        np.testing.assert_array_equal(objects["area"], [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns])


def test_coco_json_prepares_a_user_named_dataset(tmp_path):
    images, train_json, val_json, pixels = _coco_json_tree(tmp_path)
    data_dir = str(tmp_path / "data")
    builder = coco.prepare_coco_json("my_boxes", data_dir, images, train_json, val_json)
    assert {s: v.num_examples for s, v in builder.info.splits.items()} == {"train": 3, "validation": 1}
    info = sources.get_info("my_boxes", data_dir)
    # Categories sorted by id: 3 cat, 7 dog, 12 emu -> classes 0, 1, 2.
    assert (info.task, info.class_names, info.category_ids) == ("detection", ("cat", "dog", "emu"), (3, 7, 12))
    assert info.label_key == "objects" and info.num_classes == 3
    _check_records(sources.get_source("my_boxes", "train", data_dir), TRAIN, pixels)
    _check_records(sources.get_source("my_boxes", "validation", data_dir), VAL, pixels)
    # Evaluation ground truth from the records maps labels back to the JSON's ids, crowds kept.
    from evit_jax.tasks import det_metrics
    annotations = coco.read_annotations("my_boxes", "train", data_dir)
    assert annotations.sizes.tolist() == [[40, 60], [32, 32], [24, 36]]
    gt = det_metrics.coco_ground_truth(annotations, info.category_ids, info.class_names)
    assert [(a["category_id"], a["iscrowd"]) for a in gt["annotations"]] == [(3, 0), (12, 0), (7, 1), (7, 0)]
    assert gt["annotations"][0]["bbox"] == [1.5, 2.0, 20.0, 10.5]
    # Perfect detections of the non-crowd boxes score AP 1 on the prepared split (maxDets, crowds).
    real = [(int(i), o["bbox"][k], 1.0, int(o["label"][k])) for i, o in zip(annotations.image_ids, annotations.objects)
            for k in range(len(o["label"])) if not o["is_crowd"][k]]
    ids, boxes, scores, classes = (np.array(v) for v in zip(*real))
    metrics, _ = det_metrics.coco_evaluate(gt, det_metrics.Detections(ids, boxes, scores, classes))
    assert metrics["AP"] == pytest.approx(1.0)


def test_coco_json_training_view_drops_crowds_and_degenerate_boxes(tmp_path):
    from evit_jax.data import det_transforms as dt

    images, train_json, val_json, _ = _coco_json_tree(tmp_path)
    data_dir = str(tmp_path / "data")
    coco.prepare_coco_json("crowds", data_dir, images, train_json, val_json)
    source = sources.get_source("crowds", "train", data_dir)
    transform = dt.DetectionTrainTransform(max_boxes=4, hsv_prob=0.0, flip_prob=0.0)
    by_id = {int(source[i]["image_id"]): source[i] for i in range(len(source))}
    out = transform(by_id[5], (60, 60), np.random.default_rng(0))     # r = 1: boxes unchanged, clipped
    assert out["box_mask"].tolist() == [1, 1, 0, 0] and out["classes"][:2].tolist() == [0, 2]
    np.testing.assert_allclose(out["boxes"][1], [30, 20, 60, 40])
    assert transform(by_id[9], (32, 32), np.random.default_rng(0))["box_mask"].sum() == 0   # 0.5 px wide


def _expect_error(tmp_path, match, name="bad_set", train=None, val=None, images=None, val_images=None,
                  error=ValueError, data_dir=None):
    data_dir = data_dir or str(tmp_path / "data")
    with pytest.raises(error, match=match):
        coco.prepare_coco_json(name, data_dir, images, train, val, val_images)
    assert not os.path.exists(os.path.join(data_dir, name))   # nothing written


def _variant(root, edit, which="train"):
    """A fresh tree under ``root`` whose train (or val) JSON is ``edit(data, images_dir)``
    (edited in place, or the returned text)."""
    images, train_json, val_json, _ = _coco_json_tree(root)
    path = train_json if which == "train" else val_json
    data = json.loads(open(path).read())
    edited = edit(data, images)
    with open(path, "w") as f:
        f.write(edited if isinstance(edited, str) else json.dumps(data))
    return dict(images=images, train=train_json, val=val_json)


BAD_INPUTS = [
    (lambda d, _: d["annotations"][0].update(bbox=[50, 2, 20, 10]),
     r"train.json: annotation 100 box .* leaves its image 000005.png \(60x40\) by more than 1 px"),
    (lambda d, _: d["annotations"][0].update(category_id=99), r"annotation 100 has category_id 99, which is not in 'categories'"),
    (lambda d, _: d["annotations"][0].update(image_id=77), r"annotation 100 refers to image id 77"),
    (lambda d, _: d.update(images=[], annotations=[]), r"'images' is empty \(an empty split\)"),
    (lambda d, _: d.update(annotations=[]), r"'annotations' is empty"),
    (lambda d, _: d.pop("categories"), r"missing key 'categories'"),
    (lambda d, _: d["images"][0].pop("width"), r"images\[0\] has no 'width'"),
    (lambda d, _: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotations\[1\] 'bbox' = \[1, 2, 3\] is not a list of 4"),
    (lambda d, _: d["annotations"][0].update(bbox=[1, 2, -3, 4]), r"annotation 100 has a negative box size"),
    (lambda d, _: d["annotations"][0].update(iscrowd=2), r"'iscrowd' = 2 is not 0 or 1"),
    (lambda d, _: d["images"].append(dict(d["images"][0])), r"image id 5 appears twice"),
    (lambda d, _: "{not json", r"train.json: not valid JSON"),
    (lambda d, _: "[]", r"train.json: the JSON is a list, not a COCO object"),
    (lambda d, images: os.remove(os.path.join(images, d["images"][1]["file_name"])),
     r"1 of 3 images are missing from .*images, e.g. '000009.jpg'"),
    (lambda d, _: d["images"][2].update(width=37), r"image 000002.png is 36x24 but the JSON says 37x24"),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_coco_json_bad_input_fails_in_one_line_before_writing(tmp_path, case):
    edit, match = BAD_INPUTS[case]
    kwargs = _variant(tmp_path, edit)
    _expect_error(tmp_path, match, **kwargs)


def test_coco_json_val_must_declare_the_training_categories(tmp_path):
    kwargs = _variant(tmp_path, lambda d, _: d["categories"].pop(), which="val")
    _expect_error(tmp_path, r"val.json: its categories .* differ from the training JSON's", **kwargs)


def test_coco_json_name_and_paths_are_checked_first(tmp_path):
    images, train_json, val_json, _ = _coco_json_tree(tmp_path)
    data_dir = str(tmp_path / "data")
    for bad in ("Boxes", "9boxes", "a-b", "evit_det_shapes", "coco"):
        _expect_error(tmp_path, "dataset name", name=bad, images=images, train=train_json, val=val_json)
    _expect_error(tmp_path, r"--train_json .* does not exist", images=images, train=train_json + "x", val=val_json,
                  error=FileNotFoundError)
    _expect_error(tmp_path, r"--images .* is not a folder", images=images + "x", train=train_json, val=val_json,
                  error=FileNotFoundError)
    coco.prepare_coco_json("taken", data_dir, images, train_json, val_json)
    with pytest.raises(ValueError, match=r"dataset name 'taken' is taken: .*taken/1.0.0 already holds it"):
        coco.prepare_coco_json("taken", data_dir, images, train_json, val_json)


def test_coco_json_finds_images_by_base_name_and_separate_val_folder(tmp_path):
    images, train_json, val_json, pixels = _coco_json_tree(tmp_path)
    data = json.loads(open(train_json).read())
    for image in data["images"]:                       # as Label Studio writes it
        image["file_name"] = "export/images/" + image["file_name"]
    open(train_json, "w").write(json.dumps(data))
    val_folder = tmp_path / "val_images"
    val_folder.mkdir()
    name = json.loads(open(val_json).read())["images"][0]["file_name"]
    os.replace(os.path.join(images, name), val_folder / name)
    with pytest.raises(ValueError, match="missing"):
        coco.prepare_coco_json("split_folders", str(tmp_path / "data"), images, train_json, val_json)
    coco.prepare_coco_json("split_folders", str(tmp_path / "data"), images, train_json, val_json, str(val_folder))
    _check_records(sources.get_source("split_folders", "validation", str(tmp_path / "data")), VAL, pixels)


def test_prepare_cli_coco_json(tmp_path, capsys):
    images, train_json, val_json, _ = _coco_json_tree(tmp_path)
    data_dir = str(tmp_path / "data")
    argv = ["coco_json", "--name", "cli_set", "--images", images, "--train_json", train_json,
            "--val_json", val_json, "--data_dir", data_dir]
    assert prepare.main(argv) == 0
    assert "cli_set: train=3, validation=1" in capsys.readouterr().out
    assert prepare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is taken" in err
    for argv, message in [(["coco_json", "--name", "x", "--data_dir", data_dir],
                            "the following arguments are required: --images, --train_json, --val_json"),
                           (["evit_shapes", "--name", "x", "--data_dir", data_dir], "unrecognized arguments: --name x")]:
        with pytest.raises(SystemExit) as exit_info:
            prepare.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------- COCO 2017
COCO_TRAIN = [(391895, (48, 64), [{"category_id": 1, "bbox": [2, 3, 20, 30], "area": 400.0, "iscrowd": 0},
                                  {"category_id": 90, "bbox": [10, 10, 40, 30], "area": 800.0, "iscrowd": 1}]),
              (522418, (40, 40), [{"category_id": 18, "bbox": [0, 0, 39.5, 40.3], "area": 1000.0, "iscrowd": 0}])]
COCO_VAL = [(397133, (36, 52), [{"category_id": 90, "bbox": [5, 5, 10, 10], "area": 90.0, "iscrowd": 0}])]


def _coco_tree(root):
    rng = np.random.default_rng(3)
    cats = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]
    pixels = {}
    for split, folder, specs in (("train", "train2017", COCO_TRAIN), ("val", "val2017", COCO_VAL)):
        data, split_pixels = _write_split(str(root), folder, specs, rng)
        data["categories"] = cats
        data["info"] = {"year": 2017}
        pixels.update(split_pixels)
        os.makedirs(root / "annotations", exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return pixels


@pytest.mark.parametrize("zipped", [False, True])
def test_coco2017_builds_from_folders_or_zips(tmp_path, zipped):
    src = tmp_path / "src"
    pixels = _coco_tree(src)
    if zipped:
        zips = tmp_path / "zips"
        zips.mkdir()
        for part, folder in coco.COCO_FOLDERS.items():
            with zipfile.ZipFile(zips / coco.COCO_ZIPS[part], "w") as archive:
                for dirpath, _, files in os.walk(src / folder):
                    for f in files:
                        archive.write(os.path.join(dirpath, f), os.path.relpath(os.path.join(dirpath, f), src))
        src = zips
    data_dir = str(tmp_path / "data")
    builder = prepare.prepare("coco", data_dir, str(src))
    assert {s: v.num_examples for s, v in builder.info.splits.items()} == {"train": 2, "validation": 1}
    info = sources.get_info("coco", data_dir)
    assert info.class_names == ("person", "dog", "toothbrush") and info.category_ids == (1, 18, 90)
    class_of = {1: 0, 18: 1, 90: 2}
    for split, specs in (("train", COCO_TRAIN), ("validation", COCO_VAL)):
        source = sources.get_source("coco", split, data_dir)
        for i, (image_id, _, anns) in enumerate(sorted(specs)):
            by_id = {int(source[k]["image_id"]): source[k] for k in range(len(source))}
            record = by_id[image_id]
            assert np.array_equal(record["image"], pixels[image_id])
            assert record["objects"]["label"].tolist() == [class_of[a["category_id"]] for a in anns]


def test_coco2017_missing_parts_are_named(tmp_path):
    src = tmp_path / "src"
    _coco_tree(src)
    os.remove(src / "annotations" / "instances_val2017.json")
    with pytest.raises(FileNotFoundError, match=r"annotations/instances_val2017.json not found"):
        prepare.prepare("coco", str(tmp_path / "data"), str(src))
    with pytest.raises(FileNotFoundError, match=r"folder train2017/ \(or train2017.zip\)"):
        coco.Coco2017.check_manual_dir(str(tmp_path / "src" / "train2017"))
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.array_record*"))
    with pytest.raises(FileNotFoundError, match="is not prepared.*prepare coco --src"):
        sources.get_source("coco", "train", str(tmp_path / "data"))
