"""Tiny-ImageNet-200 from the official folder of JPEGs; its labelled ``val`` set is the test set.

Order of the training set: the official folder is grouped by class, so taking "the last 5000" as
validation would take 10 whole classes. The training images are therefore interleaved round-robin
over classes: the i-th image (sorted file names) of every class, in wnids.txt order, then the
(i+1)-th. The last 5000 are then the last 10 images of each class, and any prefix is balanced.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .base import DatasetFacts, ImageSet, RawDataset, channel_stats, register_reader, require_root, require_subdir

# num_classes is the official release's 200; the reader counts the wnids a release lists instead, so a
# smaller folder in the same layout (a test's) reads as what it holds
FOLDER = "tiny-imagenet-200"
TINYIMAGENET = DatasetFacts("tinyimagenet", in_channels=3, image_size=64, num_classes=200, train_images=100_000,
                            default_val_size=5000, root_holds=FOLDER)

LAYOUT = ("<root>/tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG and "
          "val/images/*.JPEG + val/val_annotations.txt (the official release)")
SIZE = TINYIMAGENET.image_size


def _decode(paths: list[Path]) -> np.ndarray:
    """(N, 3, 64, 64) uint8 from JPEG files, decoded by a thread pool (Pillow releases the GIL)."""
    out = np.empty((len(paths), 3, SIZE, SIZE), np.uint8)

    def work(i: int) -> None:
        try:
            with Image.open(paths[i]) as im:
                a = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DataError(f"tinyimagenet: cannot decode {paths[i]} ({e}); expected {LAYOUT}") from None
        if a.shape != (SIZE, SIZE, 3):
            raise DataError(f"tinyimagenet: {paths[i]} is {a.shape[1]}x{a.shape[0]}, expected 64x64 ({LAYOUT})")
        out[i] = a.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)

    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        for _ in pool.map(work, range(len(paths))):  # re-raises the first error
            pass
    return out


@register_reader(TINYIMAGENET)
def read_tinyimagenet(root: str | None) -> RawDataset:
    """100,000 train + 10,000 test 64x64 RGB images, 200 classes."""
    base = require_subdir("tinyimagenet", require_root("tinyimagenet", root, LAYOUT), FOLDER, LAYOUT)
    wnids_file, ann_file = base / "wnids.txt", base / "val" / "val_annotations.txt"
    for f in (wnids_file, ann_file):
        if not f.is_file():
            raise DataError(f"tinyimagenet: expected {LAYOUT}; missing {f}")
    wnids = wnids_file.read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    if len(index) != len(wnids) or not wnids:
        raise DataError(f"tinyimagenet: {wnids_file} must list distinct wnids, one a line ({LAYOUT})")

    per_class = []  # sorted JPEG paths of each class, in wnids.txt order
    for w in wnids:
        folder = base / "train" / w / "images"
        files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
        if not files:
            raise DataError(f"tinyimagenet: expected {LAYOUT}; no JPEGs in {folder}")
        per_class.append(files)
    # Round-robin over classes (see module docstring): sort by (rank within class, class index).
    order = sorted((r, c) for c, files in enumerate(per_class) for r in range(len(files)))
    train_paths = [per_class[c][r] for r, c in order]
    train_labels = [c for _, c in order]

    test_paths, test_labels = [], []
    for n, line in enumerate(ann_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"tinyimagenet: {ann_file} line {n} is not 'filename<TAB>wnid<TAB>bbox' "
                            f"with a wnid from wnids.txt ({LAYOUT})")
        path = base / "val" / "images" / fields[0]
        if not path.is_file():
            raise DataError(f"tinyimagenet: expected {LAYOUT}; missing {path} (listed in {ann_file.name})")
        test_paths.append(path)
        test_labels.append(index[fields[1]])
    if not test_paths:
        raise DataError(f"tinyimagenet: {ann_file} lists no images ({LAYOUT})")

    train = ImageSet.from_numpy(_decode(train_paths), train_labels)
    test = ImageSet.from_numpy(_decode(test_paths), test_labels)
    mean, std = channel_stats(train.images)
    return RawDataset(train, test, len(wnids), mean, std, default_val_size=TINYIMAGENET.default_val_size)
