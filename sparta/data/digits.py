"""scikit-learn's bundled 8x8 handwritten digits: tiny, always present, used by demos and smoke tests."""
from __future__ import annotations

import numpy as np

from .base import DatasetFacts, ImageSet, RawDataset, channel_stats, register_reader

# a fixed split of the 1797 images: the first 1297 train, the last 500 test; no root is read
DIGITS = DatasetFacts("digits", in_channels=1, image_size=8, num_classes=10, train_images=1297, default_val_size=200,
                      root_holds=None)


@register_reader(DIGITS)
def read_digits(root: str | None = None) -> RawDataset:
    """1797 8x8 grayscale digits shipped inside scikit-learn (no download); ``root`` is ignored."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 (start-up: sklearn takes ~1 s to import; every `import sparta.data` loads this module)

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None]  # values 0..16 -> 0..255, (N, 1, 8, 8)
    n = DIGITS.train_images
    train = ImageSet.from_numpy(x[:n], d.target[:n])
    test = ImageSet.from_numpy(x[n:], d.target[n:])
    mean, std = channel_stats(train.images)
    return RawDataset(train, test, DIGITS.num_classes, mean, std, default_val_size=DIGITS.default_val_size)
