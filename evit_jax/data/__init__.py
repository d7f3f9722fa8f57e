"""Datasets and input pipelines (host side; never imports models).

- `sources`: `get_source(name, split, data_dir)`, `get_info(name, data_dir)` for every
  known dataset (built-in synthetic ones are generated on first use).
- `synthetic_cls`: the `evit_shapes` classification builder.
- `transforms`: per-example classification transforms (RandomResizedCrop, flip, eval crop),
  with `randaugment` (timm's RandAugment) and `random_erasing` (the erasing boxes).
- `image_folder`: user-named classification datasets from image folders (`prepare image_folder`).
- `pipeline`: grain train/eval iterators (sharded per process, checkpointable).
- `imagenet_classes`: the ImageNet-1k class names, shipped with the package (WordNet 3.0 lemmas).

Submodules are imported explicitly (`from evit_jax.data import pipeline`) so that
importing one does not pay for the others (tfds import costs about a second).
"""
