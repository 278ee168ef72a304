"""scikit-learn's bundled 8x8 handwritten digits: tiny, always present, used by demos and smoke tests."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from .base import DatasetFacts, ImageSet, RawDataset, channel_stats, register_reader

# a fixed split of the 1797 images: the first 1297 train, the last 500 test; no root is read
DIGITS = DatasetFacts("digits", in_channels=1, image_size=8, num_classes=10, train_images=1297, default_val_size=200,
                      root_holds=None)


def _digits_csv() -> Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn (that import
    takes about 1 s, paid by every demo, test process and worker); None where that release keeps it elsewhere."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as (images (1797, 8, 8) float64 in 0..16, labels (1797,) int64), as
    ``sklearn.datasets.load_digits`` returns them: read from its CSV (64 pixels then the label per row)."""
    path = _digits_csv()
    if path is None:
        from sklearn.datasets import load_digits  # noqa: PLC0415 (start-up: sklearn takes ~1 s to import)

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


@register_reader(DIGITS)
def read_digits(root: str | None = None) -> RawDataset:
    """1797 8x8 grayscale digits shipped inside scikit-learn (no download); ``root`` is ignored."""
    images, labels = load_digits_arrays()
    x = np.rint(images * (255 / 16)).astype(np.uint8)[:, None]  # values 0..16 -> 0..255, (N, 1, 8, 8)
    n = DIGITS.train_images
    train = ImageSet.from_numpy(x[:n], labels[:n])
    test = ImageSet.from_numpy(x[n:], labels[n:])
    mean, std = channel_stats(train.images)
    return RawDataset(train, test, DIGITS.num_classes, mean, std, default_val_size=DIGITS.default_val_size)
