"""SVHN (cropped digits, format 2) from the official MATLAB files train_32x32.mat and test_32x32.mat."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import DatasetFacts, ImageSet, RawDataset, register_reader, require_files, require_root

TRAIN_FILE = "train_32x32.mat"
SVHN = DatasetFacts("svhn", in_channels=3, image_size=32, num_classes=10, train_images=73_257, default_val_size=5000,
                    root_holds=TRAIN_FILE)  # the 'extra' set is not used

LAYOUT = "<root>/train_32x32.mat and test_32x32.mat (the official cropped-digits format 2)"


def _load_mat(path: Path) -> ImageSet:
    import scipy.io  # noqa: PLC0415 (start-up: scipy.io takes ~0.2 s to import; every `import sparta.data` loads this module)

    try:
        d = scipy.io.loadmat(str(path), variable_names=["X", "y"])
        x, y = np.asarray(d["X"]), np.asarray(d["y"]).reshape(-1)
    except Exception as e:  # not a .mat file, or no X / y
        raise DataError(f"svhn: {path} is not a MATLAB file with variables X and y (expected {LAYOUT}): "
                        f"{type(e).__name__}: {e}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise DataError(f"svhn: {path} holds X {x.shape} {x.dtype} and {y.size} labels; expected X 32x32x3xN uint8 "
                        f"and N labels ({LAYOUT})")
    y = y.astype(np.int64)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"svhn: {path} has labels outside 1..10 ({LAYOUT})")
    y[y == 10] = 0  # the official files label digit 0 as 10
    return ImageSet.from_numpy(x.transpose(3, 2, 0, 1), y)  # (32, 32, 3, N) -> (N, 3, 32, 32)


@register_reader(SVHN)
def read_svhn(root: str | None) -> RawDataset:
    """73,257 train + 26,032 test 32x32 RGB house-number digits, 10 classes ('extra' is not used)."""
    train, test = require_files("svhn", require_root("svhn", root, LAYOUT),
                                [TRAIN_FILE, "test_32x32.mat"], LAYOUT)
    return RawDataset(_load_mat(train), _load_mat(test), SVHN.num_classes, mean=(0.4377, 0.4438, 0.4728),
                      std=(0.1980, 0.2010, 0.1970), default_val_size=SVHN.default_val_size)
