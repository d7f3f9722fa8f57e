"""ImageNet-1k class names, shipped with the package (no download).

    imagenet_class_names()[281]   # 'tabby, tabby cat'
    readable_class_names(names)   # ImageNet synset ids (tfds imagenet2012's labels) -> those names

`imagenet_classes.tsv` beside this file holds the 1000 classes in class-index order: the WordNet synset
id and the synset's WordNet 3.0 lemmas (its header names the sources and the WordNet license).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.tsv")
NUM_IMAGENET_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def _table() -> tuple[tuple[str, str], ...]:
    rows = []
    for line in IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            synset, names = line.split("\t")
            rows.append((synset, names))
    if len(rows) != NUM_IMAGENET_CLASSES:  # a damaged installation, not a user error
        raise RuntimeError(f"{IMAGENET_CLASSES_FILE} holds {len(rows)} classes, not {NUM_IMAGENET_CLASSES}")
    return tuple(rows)


def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 WordNet synset ids ("n01440764", ...) in class-index order."""
    return tuple(synset for synset, _ in _table())


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 human-readable class names ("tench, Tinca tinca", ...) in class-index order."""
    return tuple(names for _, names in _table())


def readable_class_names(names: Sequence[str]) -> list[str]:
    """`names` with ImageNet synset ids replaced by their class names (tfds's imagenet2012 labels are
    synset ids); any other list of names is returned as it is."""
    lookup = dict(_table())
    return [lookup.get(name, name) for name in names]
