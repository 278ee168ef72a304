"""MNIST from the four official IDX files, plain or gzipped."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import DatasetFacts, ImageSet, RawDataset, register_reader, require_root

MNIST = DatasetFacts("mnist", in_channels=1, image_size=28, num_classes=10, train_images=60_000, default_val_size=5000,
                     root_holds=None)  # plain or gzipped files, in the root or in MNIST/raw: no single entry

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
LAYOUT = ("<root>/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte "
          "(the official IDX files, each plain or .gz; <root>/MNIST/raw also works)")
_MAGIC = {2051: 3, 2049: 1}  # magic number -> number of dims (images: N, rows, cols; labels: N)


def _find(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of one IDX file whose header must carry ``magic``."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"mnist: cannot read {path} ({e}); expected {LAYOUT}") from None
    ndim = _MAGIC[magic]
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic or len(raw) < header:
        raise DataError(f"mnist: {path} has magic number {found}, expected {magic} (an IDX file, {LAYOUT})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]  # big-endian uint32
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"mnist: {path} header says {'x'.join(map(str, dims))} bytes of data but holds "
                        f"{len(raw) - header} (truncated file? {LAYOUT})")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_split(root: Path, split: str) -> ImageSet:
    found = [_find(root, stem) for stem in FILES[split]]
    missing = [stem for stem, p in zip(FILES[split], found) if p is None]
    if missing:
        raise DataError(f"mnist: expected {LAYOUT}; missing {', '.join(missing)} in {root}")
    paths = [p for p in found if p is not None]  # all of them
    images, labels = _read_idx(paths[0], 2051), _read_idx(paths[1], 2049)
    if len(images) != len(labels):
        raise DataError(f"mnist: {paths[0].name} has {len(images)} images but {paths[1].name} has "
                        f"{len(labels)} labels ({LAYOUT})")
    if labels.size and labels.max() > MNIST.num_classes - 1:
        raise DataError(f"mnist: {paths[1]} has labels above {MNIST.num_classes - 1} ({LAYOUT})")
    return ImageSet.from_numpy(images[:, None], labels)  # (N, 28, 28) -> (N, 1, 28, 28)


@register_reader(MNIST)
def read_mnist(root: str | None) -> RawDataset:
    """60,000 train + 10,000 test 28x28 grayscale digits, 10 classes."""
    path = require_root("mnist", root, LAYOUT)
    return RawDataset(_read_split(path, "train"), _read_split(path, "test"), MNIST.num_classes,
                      mean=(0.1307,), std=(0.3081,), default_val_size=MNIST.default_val_size)
