"""The evit_seg_shapes generator and builder."""

import numpy as np

from evit_jax.data import synthetic_seg
from evit_jax.data.synthetic_seg import CLASS_NAMES, IGNORE_INDEX, EvitSegShapes, EvitSegShapesConfig

VALID_IDS = set(range(len(CLASS_NAMES))) | {IGNORE_INDEX}


def test_generation_is_deterministic_per_index():
    a_image, a_mask = synthetic_seg.generate_example("train", 7)
    b_image, b_mask = synthetic_seg.generate_example("train", 7)
    c_image, _ = synthetic_seg.generate_example("validation", 7)
    assert np.array_equal(a_image, b_image) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_image, c_image)
    assert a_image.shape == (128, 128, 3) and a_image.dtype == np.uint8
    assert a_mask.shape == (128, 128) and a_mask.dtype == np.uint8


def test_masks_hold_valid_ids_every_class_and_some_ignore():
    masks = np.stack([synthetic_seg.generate_example("train", i)[1] for i in range(60)])
    assert set(np.unique(masks).tolist()) == VALID_IDS  # Every class appears, nothing else.
    ignore_fraction = (masks == IGNORE_INDEX).mean()
    assert 0.01 < ignore_fraction < 0.15
    # Objects are large enough for a stride-8 model: a mean object covers > 300 pixels.
    foreground = ((masks > 0) & (masks != IGNORE_INDEX)).sum() / len(masks)
    assert foreground > 600


def test_ignore_band_separates_different_labels():
    for index in range(10):
        _, mask = synthetic_seg.generate_example("validation", index)
        labelled = mask != IGNORE_INDEX
        # No two 4-neighbours carry different non-ignore labels.
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            both = (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
            assert not np.any(both & (a != b))
        assert labelled.mean() > 0.8


def test_class_is_not_given_away_by_colour():
    # Mean colour of each shape class over many scenes stays close to the overall mean.
    sums = np.zeros((len(CLASS_NAMES), 3))
    counts = np.zeros(len(CLASS_NAMES))
    for index in range(80):
        image, mask = synthetic_seg.generate_example("train", index)
        for c in range(1, len(CLASS_NAMES)):
            region = mask == c
            sums[c] += image[region].sum(axis=0)
            counts[c] += region.sum()
    means = sums[1:] / counts[1:, None]
    assert np.abs(means - means.mean(axis=0)).max() < 35


def test_shape_masks_differ_between_classes():
    masks = [synthetic_seg.shape_mask(c, 64, 32, 32, 20, 0.3) for c in range(1, len(CLASS_NAMES))]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.85, (CLASS_NAMES[i + 1], CLASS_NAMES[j + 1], iou)


def test_builder_writes_and_reads_back_exact_examples(tmp_path):
    config = EvitSegShapesConfig(name="test", image_size=64, num_train=5, num_validation=3)
    builder = EvitSegShapes(data_dir=str(tmp_path), config=config, file_format="array_record")
    builder.download_and_prepare()
    assert EvitSegShapes.NUM_CLASSES == len(CLASS_NAMES) == 7
    for split, size in (("train", 5), ("validation", 3)):
        source = builder.as_data_source(split)
        assert len(source) == size
        for index in range(size):
            record = source[index]
            image, mask = synthetic_seg.generate_example(split, index, 64)
            assert np.array_equal(record["image"], image)  # PNG: lossless.
            assert record["segmentation_mask"].shape == (64, 64, 1)
            assert record["segmentation_mask"].dtype == np.uint8
            assert np.array_equal(record["segmentation_mask"][..., 0], mask)
            assert record["file_name"].decode() == f"{split}/{index:05d}.png"


def test_registered_configs():
    configs = EvitSegShapes.builder_configs
    assert (configs["default"].image_size, configs["default"].num_train,
            configs["default"].num_validation) == (128, 4000, 500)
    assert configs["tiny"].num_train < 200
